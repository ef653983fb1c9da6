"""Toy lab (paper Appendix D.1): the one command, and the paper's qualitative findings at toy scale."""

import json
from pathlib import Path

import pytest
import torch

from toylab.blobs import ToyConfig, main, make_mlp, run_toy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
@pytest.mark.slow
def test_powers_near_one_half_keep_both_dimensions_far_ones_collapse_one():
    erank = {p: run_toy(ToyConfig(kind="power", power=p, seed=0)).effective_rank for p in (0.0, 0.5, 1.5)}
    # measured: p=0 -> 1.045 (lgIoC -2.1), p=0.5 -> 2.000 (hard whitening), p=1.5 -> 1.15 (lgIoC -1.5)
    assert erank[0.5] > 1.9, erank
    assert erank[0.0] < 1.3 and erank[1.5] < 1.3, erank


@pytest.mark.slow
def test_iternorm_alone_collapses_where_intl_does_not():
    alone = run_toy(ToyConfig(kind="iternorm", iters=1, beta=0.0, seed=0))
    intl = run_toy(ToyConfig(kind="iternorm", iters=1, beta=0.01, seed=0))
    # measured: IterNorm T=1 alone 1.02 (lgIoC -2.5) vs INTL (T=1, beta 0.01) 1.92 (lgIoC -0.3)
    assert alone.effective_rank < 1.1 and intl.effective_rank > 1.8, (alone.effective_rank, intl.effective_rank)
    assert intl.lg_ioc - alone.lg_ioc > 1.5


# ------------------------------------------------------------------------- the image half of the lab
@pytest.mark.slow
def test_image_sweep_one_command_writes_table_json_plot_and_reuses_runs(tiny_synthetic, tmp_path, capsys):
    import math

    from common.runlog import is_complete
    from toylab import images as toylab_images

    out = tmp_path / "img"
    argv = ["--out", str(out), "--data", str(tiny_synthetic / "classification"), "--steps", "2", "--powers", "0.5",
            "--iters", "1", "--knn", "data.workers=0", "knn.k=5", "--", "data.workers=0", "optim.batch_size=16",
            "model.projector=[64,64]", "train.spectrum_every=1", "train.log_every=1"]
    assert toylab_images.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in res["rows"]] == ["st_power_p0.5", "iternorm_only_T1", "intl_T1", "random_init"]
    for r in res["rows"][:3]:  # the pretrained variants: their run, the engine's spectrum metrics, a k-NN
        assert r["steps"] == 2 and is_complete(out / "runs" / r["variant"])
        assert all(math.isfinite(r[k]) for k in ("final_loss", "effective_rank", "lg_ioc"))
        assert 1.0 <= r["effective_rank"] <= 64.0
    for r in res["rows"]:
        assert 0.0 <= r["knn_top1"] <= r["knn_top5"] <= 100.0 and r["k"] == 5
    md = (out / "results.md").read_text()
    assert "| intl T=1 | 2 |" in md and "| random init (no pretraining) | 0 |" in md
    assert (out / "results.png").stat().st_size > 0
    # again: every run is complete, so nothing is retrained and the numbers are the same
    stamp = (out / "runs" / "intl_T1" / "last.pth").stat().st_mtime_ns
    assert toylab_images.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert (out / "runs" / "intl_T1" / "last.pth").stat().st_mtime_ns == stamp


def test_image_sweep_bad_arguments_name_the_fix(tmp_path, capsys):
    from toylab import images as toylab_images

    with pytest.raises(SystemExit) as e:
        toylab_images.main(["--data", str(tmp_path / "nope")])
    assert e.value.code == 2 and "make data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toylab_images.main(["--powers", "a,b"])
    assert "comma-separated numbers" in capsys.readouterr().err
