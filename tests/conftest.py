import os

# Must be set before huggingface_hub is imported: an accidental hub call then fails at once
# instead of retrying for tens of seconds.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


# The tiny models gain nothing from a second thread, and intra-op threads spinning against other work on a
# 2-core machine can slow a test tenfold.
torch.set_num_threads(1)


# Every family runs the correctness checks of tests/test_family_common.py by default (rollout equals the pipeline,
# ratio 1, RLG; each newer family's own test file trains it through the CLI). The longer per-family runs (the
# benchmarks, the ddpo/prdp CLI runs, the default-resolution rules) run by default for the families below, one of each
# architecture, and for the others with `-m slow`: the default suite stays near 10 minutes as families are added.
# (The kill + resume runs are marked slow for every family: three CLI subprocesses each, minutes on 2 cores.)
CORE_FAMILIES = {"sd", "sdxl", "sd3", "flux", "zimage"}
# `diffalign bench train` / `bench rlg` on a tiny directory of each family: by default on SD only (each 3-16 s; the
# per-family part is the family's rollout and RLG route, which its own checks cover by default)
BENCH_ONE_FAMILY = {"test_bench_train", "test_bench_rlg"}
# Per-family checks whose code path is shared: by default on the families that stand for each path, on the others
# with -m slow (each 1-7 s). `generate`: the RLG pipeline (SD), the modular guider (Z-Image), an edit through a
# pipeline (Kontext) and through the guider (Qwen-Image-Edit), image- and video-to-video; the CLI run: UNet and
# flow (the forward trainers' runs cover the rest by default); pickle refusal and resolution rules: SD (and SD3).
DEFAULT_FAMILIES_OF = {
    "test_generate_picks_the_family_rlg_pipeline": {"sd", "zimage", "flux_kontext", "qwenimage_edit", "wan_i2v",
                                                    "wan_v2v"},
    "test_cli_trains_each_family_and_the_lora_loads_in_its_pipelines": {"sd", "sd3"},
    "test_pickle_weights_are_refused": {"sd"},
    "test_resolution_rules": {"sd", "sd3"},
}
LONG_PER_FAMILY = {"test_bench_rollout", "test_bench_train", "test_bench_rlg", "test_resolution_rules",
                   "test_cli_trains_each_family_and_the_lora_loads_in_its_pipelines",
                   "test_killed_run_resumes_bit_identically"}

# The forward-process trainers' CLI runs on every family (`test_forward_trainers_train_each_family_...`): slow for
# every family but one per trainer, 2-4 s each, families whose own files run no forward trainer by default (SD, SDXL,
# SD3 and FLUX run them in tests/test_forward_families.py and the trainers' own files).
FORWARD_DEFAULT_SUITE = {("nft", "wan_v2v"), ("awm", "wan_i2v"), ("dgpo", "zimage")}


def _family_of(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    family = params.get("family_dir", params.get("family_class"))
    return family if isinstance(family, str) or family is None else getattr(family, "name", None)


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        family = _family_of(item)
        if item.originalname == "test_forward_trainers_train_each_family_and_the_lora_loads_in_its_pipelines":
            if (item.callspec.params["algorithm"], family) not in FORWARD_DEFAULT_SUITE:
                item.add_marker(pytest.mark.slow)
            continue
        if item.originalname in BENCH_ONE_FAMILY and family is not None and family != "sd":
            item.add_marker(pytest.mark.slow)  # the bench's paths are the same for every family: SD runs by default
            continue
        if item.originalname in DEFAULT_FAMILIES_OF and family is not None:
            if family not in DEFAULT_FAMILIES_OF[item.originalname]:
                item.add_marker(pytest.mark.slow)
            continue
        if family is None or family in CORE_FAMILIES:
            continue
        if item.originalname in LONG_PER_FAMILY:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    # custom_pipeline loading copies modules into HF_HOME; keep that out of the user's cache.
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random SD pipeline saved in diffusers format (safetensors), shared by the session."""
    from diffalign.testing import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def _tiny_pipe_template():
    from diffalign.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture
def tiny_pipe(_tiny_pipe_template):
    """A fresh copy of a tiny random `StableDiffusionPipeline` (tests may add adapters or train it)."""
    import copy

    torch.manual_seed(0)
    return copy.deepcopy(_tiny_pipe_template)
