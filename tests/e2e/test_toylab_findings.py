"""The toy lab's findings at full toy scale (2400 steps each) and the image sweep's one command."""

import json

import pytest

from toylab.blobs import ToyConfig, run_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_powers_near_one_half_keep_both_dimensions_far_ones_collapse_one():
    erank = {p: run_toy(ToyConfig(kind="power", power=p, seed=0)).effective_rank for p in (0.0, 0.5, 1.5)}
    # measured: p=0 -> 1.045 (lgIoC -2.1), p=0.5 -> 2.000 (hard whitening), p=1.5 -> 1.15 (lgIoC -1.5)
    assert erank[0.5] > 1.9, erank
    assert erank[0.0] < 1.3 and erank[1.5] < 1.3, erank


def test_iternorm_alone_collapses_where_intl_does_not():
    alone = run_toy(ToyConfig(kind="iternorm", iters=1, beta=0.0, seed=0))
    intl = run_toy(ToyConfig(kind="iternorm", iters=1, beta=0.01, seed=0))
    # measured: IterNorm T=1 alone 1.02 (lgIoC -2.5) vs INTL (T=1, beta 0.01) 1.92 (lgIoC -0.3)
    assert alone.effective_rank < 1.1 and intl.effective_rank > 1.8, (alone.effective_rank, intl.effective_rank)
    assert intl.lg_ioc - alone.lg_ioc > 1.5


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
