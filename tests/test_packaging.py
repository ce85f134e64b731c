import os
import re
import subprocess
import sys
import zipfile

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


def test_wheel_ships_one_namespace_with_its_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", ROOT, "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert len(top_level) == 2 and "diffalign" in top_level
    assert all(name == "diffalign" or name.endswith(".dist-info") for name in top_level)
    for required in ("diffalign/pipelines/pipeline_stable_diffusion_rlg.py", "diffalign/rewards/digits.py",
                     "diffalign/configs/digits-prdp.yaml", "diffalign/assets/bpe_simple_vocab_16e6.txt.gz",
                     "diffalign/models/digits/unet/diffusion_pytorch_model.safetensors"):
        assert required in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for n in names)  # no pickled weights
