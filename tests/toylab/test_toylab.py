"""Toy lab (paper Appendix D.1): the one command, and the paper's qualitative findings at toy scale."""

import json
from pathlib import Path

import pytest

from toylab.blobs import ToyConfig, main, make_mlp, run_toy

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mlp_and_a_short_run_are_deterministic():
    mlp = make_mlp()
    assert [m.__class__.__name__ for m in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d",
                                                   "ReLU", "Linear"]
    assert mlp[0].in_features == 2 and mlp[3].in_features == 16 and mlp[-1].out_features == 2
    cfg = ToyConfig(kind="iternorm", iters=3, beta=0.01, epochs=1, record_every=5)
    a, b = run_toy(cfg), run_toy(cfg)
    assert a.steps == [0, 5, 10, 15, 16] and len(a.loss) == 16    # 512 / 32 = 16 steps per epoch
    assert a.eigenvalues == b.eigenvalues and a.loss == b.loss
    assert a.final_output.shape == (512, 2) and len(a.final_eigenvalues) == 2
    assert a.final_eigenvalues[0] >= a.final_eigenvalues[1] >= 0


def test_one_command_writes_plots_and_tables(tmp_path, capsys):
    out = tmp_path / "toylab"
    assert main(["--out", str(out), "--powers", "0,0.5", "--iters", "2", "--epochs", "1"]) == 0
    for name in ("power_outputs.png", "power_eigenvalues.png", "iternorm_outputs.png", "iternorm_eigenvalues.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["power"]] == ["p=0", "p=0.5"]
    assert [r["label"] for r in results["iternorm"]] == ["T=2", "T=2 +TL(0.01)"]
    assert "| iternorm | T=2 +TL(0.01) |" in (out / "results.md").read_text()
    assert "[toylab 4/4]" in capsys.readouterr().out


def test_bad_arguments_exit_non_zero_with_a_message(tmp_path, capsys):
    out = tmp_path / "toylab"
    assert main(["--out", str(out), "--powers", "half"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert main(["--out", str(out), "--iters", "0"]) == 2
    assert "T >= 1" in capsys.readouterr().err
    assert not out.exists(), "nothing is written for bad input"


# ------------------------------------------------------------------------------------------------------
# Findings (seed 0, the paper's toy: 512 points, batch 32, SGD lr 0.1, 150 epochs = 2400 steps).
# Effective rank of the transformed output on all points: 2 = both dimensions kept, 1 = one collapsed.
# ------------------------------------------------------------------------------------------------------




# ------------------------------------------------------------------------- the image half of the lab


def test_image_sweep_bad_arguments_name_the_fix(tmp_path, capsys):
    from toylab import images as toylab_images

    with pytest.raises(SystemExit) as e:
        toylab_images.main(["--data", str(tmp_path / "nope")])
    assert e.value.code == 2 and "make data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toylab_images.main(["--powers", "a,b"])
    assert "comma-separated numbers" in capsys.readouterr().err
