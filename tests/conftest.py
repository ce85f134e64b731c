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
