import subprocess
import sys

from stage_fixtures import ROOT


def test_imports_in_venv():
    """The pinned environment provides detectron2 with its compiled ops next to our packages."""
    out = subprocess.run(
        [sys.executable, "-c", "import detectron2, detectron2._C, pretrain, transfer, slurm, torch, numpy;"
         "print(torch.__version__, numpy.__version__)"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    torch_version, numpy_version = out.stdout.split()
    assert torch_version.startswith("2."), torch_version
    assert numpy_version.startswith("1."), numpy_version


def test_lock_pins_match_installed():
    """requirements/lock.txt is what is installed (so CI and users get the same versions)."""
    from importlib.metadata import version

    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==")
            pins[name.strip()] = ver.strip()
    for name in ("torch", "torchvision", "numpy", "hydra-core", "omegaconf", "submitit", "fvcore", "pycocotools"):
        assert version(name).split("+")[0] == pins[name], name
    assert version("sal-detectron2") == "0.7.2"


def test_find_python310_reports_failure(tmp_path):
    """Without any Python 3.10 the venv builder stops with a message saying how to get one."""
    env = {"PATH": str(tmp_path), "PYTHON310": "/nonexistent"}
    out = subprocess.run(["/bin/bash", str(ROOT / "tools" / "find-python310.sh")], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 1
    assert "Python 3.10 was not found" in out.stderr and "pyenv install" in out.stderr
