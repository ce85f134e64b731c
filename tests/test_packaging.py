import os
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARE_IMPORT = re.compile(r"^\s*(from|import)\s+(pipelines|rewards|configs)\b", re.MULTILINE)


def test_sources_never_import_the_mapped_folders_bare():
    # `import pipelines` from the repo root would load a second copy of every class (see pyproject package-dir).
    offenders = []
    for folder in ("diffalign", "pipelines", "rewards", "tests", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        if BARE_IMPORT.search(f.read()):
                            offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "-q", ROOT, "--no-deps", "-w", str(out)]
    # The installed setuptools first (fast, offline); an isolated build only if it is too old for pyproject's
    # `requires` (a venv's own setuptools 65 cannot build wheels without the `wheel` package).
    build = subprocess.run(command + ["--no-build-isolation"], capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (name,) = [p for p in os.listdir(out) if p.endswith(".whl")]
    return out / name


def test_wheel_ships_one_namespace_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert len(top_level) == 2 and "diffalign" in top_level
    assert all(name == "diffalign" or name.endswith(".dist-info") for name in top_level)
    for required in ("diffalign/pipelines/__init__.py", "diffalign/pipelines/pipeline_stable_diffusion_rlg.py",
                     "diffalign/rewards/digits.py", "diffalign/configs/digits-prdp.yaml",
                     "diffalign/assets/bpe_simple_vocab_16e6.txt.gz", "diffalign/models/digits/model_index.json",
                     "diffalign/models/digits/unet/diffusion_pytorch_model.safetensors"):
        assert required in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for n in names)  # no pickled weights


def test_wheel_ships_every_package_of_the_source_tree(wheel):
    # pyproject lists the packages by hand: a new `diffalign/<sub>/__init__.py` left off the list would be missing
    # from every regular install while editable installs and the tests in a checkout still find it.
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for source, installed in (("diffalign", "diffalign"), ("pipelines", "diffalign/pipelines"),
                              ("rewards", "diffalign/rewards"), ("configs", "diffalign/configs")):
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, source)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" not in files:
                continue
            package = os.path.join(installed, os.path.relpath(dirpath, os.path.join(ROOT, source)))
            for name in files:
                if name.endswith(".py"):
                    path = os.path.normpath(os.path.join(package, name)).replace(os.sep, "/")
                    if path not in names:
                        missing.append(path)
    assert missing == []


IMPORT_MAPPED = """
import importlib.util, diffalign, diffalign.pipelines, diffalign.configs
print(diffalign.__file__)
print(diffalign.pipelines.__file__)
print(importlib.util.find_spec("diffalign.rewards").origin)
print(diffalign.configs.__file__)
"""


def test_mapped_subpackages_import_from_a_checkout_and_from_a_regular_install(wheel, tmp_path):
    # A plain `pip install .` has no import hook mapping `diffalign.pipelines` to the checkout's `pipelines/`: run
    # from the repo root, the checkout's `diffalign/` shadows the installed package and its `__init__` must extend
    # the package path itself. `python -S` leaves out site-packages, and with it the hook of an editable install.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    in_checkout = [os.path.join(ROOT, folder) for folder in ("diffalign", "pipelines", "rewards", "configs")]
    installed = [os.path.join(site, "diffalign", *sub) for sub in ((), ("pipelines",), ("rewards",), ("configs",))]
    for cwd, expected in ((ROOT, in_checkout), (tmp_path, installed)):
        run = subprocess.run([sys.executable, "-S", "-c", IMPORT_MAPPED], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        found = [os.path.realpath(os.path.dirname(path)) for path in run.stdout.split()]
        assert found == [os.path.realpath(path) for path in expected]
