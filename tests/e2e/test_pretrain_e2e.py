"""End-to-end pretraining runs on CPU (slow): kill-and-resume reproduces the uninterrupted losses
exactly; the EMA multi-crop preset runs with its 6 views (and logs the top-k spectrum dynamics). What a short
pretraining learns is in test_short_pretraining.py."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import LAST_NAME, load_checkpoint
from common.runlog import read_metrics
from pretrain.spectrum import saturation_step
from stage_fixtures import compose_pretrain, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", *overrides]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


MONITOR_KEYS = ("probe_train_top1", "probe_val_top1", "knn_top1", "knn_top5")


def _monitor(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, key, value) of every probe / k-NN figure of the run, in order."""
    return [(r["step"], k, r[k]) for r in read_metrics(run_dir) for k in MONITOR_KEYS if k in r]


def test_kill_and_resume_reproduces_the_uninterrupted_losses(tiny_synthetic, tmp_path):
    # 120 images / batch 16 = 7 steps per epoch, 2 epochs: the kill lands in epoch 0 or 1, the resume
    # skips the steps already done in that epoch; one DataLoader worker, as in real runs.
    common = ["optim.epochs=2", "train.ckpt_every_steps=3", "data.workers=1", "optim.warmup_epochs=1",
              "train.eval_every=1", "train.knn_every=1"]  # the monitor at both epoch ends
    ref_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = subprocess.run(_train_cmd(tiny_overrides(tiny_synthetic, ref_dir, *common)), env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _losses(ref_dir)
    assert sorted(want) == list(range(1, 15))

    # Kill (SIGKILL: no clean-up at all) once step 5 is logged: the checkpoint of step 3 survives.
    proc = subprocess.Popen(_train_cmd(tiny_overrides(tiny_synthetic, cut_dir, *common)), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if max(_losses(cut_dir), default=0) >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(cut_dir / LAST_NAME)["step"]
    assert killed_at in (3, 6, 7, 9, 12) and not (cut_dir / "COMPLETE").exists()  # every 3 steps + epoch end (7)

    resumed = subprocess.run(_train_cmd(tiny_overrides(tiny_synthetic, cut_dir, *common)), env=_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {killed_at}" in resumed.stdout + resumed.stderr
    got = _losses(cut_dir)
    assert got == want  # every step, before and after the kill, bit for bit
    # The probe (its state is in the checkpoint) and the monitor continue as if never interrupted.
    monitor_ref, monitor_cut = _monitor(ref_dir), _monitor(cut_dir)
    assert {(s, k) for s, k, _ in monitor_ref} >= {(7, "probe_val_top1"), (14, "knn_top1"), (14, "probe_train_top1")}
    assert monitor_cut == monitor_ref
    a, b = load_checkpoint(ref_dir / LAST_NAME), load_checkpoint(cut_dir / LAST_NAME)
    assert a["finished"] and b["finished"] and a["step"] == b["step"] == 14
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # provenance.json: the killed start and the resume, both `python -m pretrain.train ...`; COMPLETE: the resume.
    attempts = json.loads((cut_dir / "provenance.json").read_text())["attempts"]
    assert len(attempts) == 2 and all(shlex.split(a["command_line"]) == _train_cmd(tiny_overrides(
        tiny_synthetic, cut_dir, *common)) for a in attempts)
    summary = json.loads((cut_dir / "COMPLETE").read_text())["provenance"]
    assert summary["world_size"] == 1 and summary["attempts"] == 2 and summary["started"] == attempts[1]["started"]
    print(f"killed after step >= 5, resumed from step {killed_at}; 14 losses identical, final loss {got[14]:.6f}; "
          f"{len(monitor_ref)} probe / k-NN figures identical")


def test_ema_multicrop_preset_runs_with_six_views(tiny_synthetic, tmp_path):
    from pretrain.train import run

    overrides = ["pretrain/preset=imagenet_800ep_multicrop_ema", "pretrain/data=synthetic_multicrop",
                 f"data.root={tiny_synthetic / 'classification'}", f"run_dir={tmp_path / 'mc'}", "data.workers=0",
                 # the preset's multi-crop, scaled down to the tiny 32-px images (sizes 24/24/20/17/14/10)
                 "++data.augment.views=[{size:24,min_scale:0.2},{size:24,min_scale:0.2},"
                 "{size:20,min_scale:0.171,max_scale:0.857},{size:17,min_scale:0.143,max_scale:0.714},"
                 "{size:14,min_scale:0.114,max_scale:0.571},{size:10,min_scale:0.086,max_scale:0.429}]",
                 "model.arch=resnet18", "model.projector=[64,64,64]", "optim.batch_size=16", "train.max_steps=3",
                 "train.log_every=1", "train.spectrum_every=1", "train.spectrum_topk=5"]
    cfg = compose_pretrain(overrides)
    assert cfg.method.ema is True and len(cfg.data.augment.views) == 6
    summary = run(cfg)
    rows = [r for r in read_metrics(tmp_path / "mc") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["ema_momentum"] == pytest.approx(0.996) and rows[-1]["ema_momentum"] > rows[0]["ema_momentum"]
    ckpt = load_checkpoint(tmp_path / "mc" / LAST_NAME)
    assert ckpt["ema_model"] is not None and set(ckpt["ema_model"]) == set(ckpt["model"])
    assert any(not torch.equal(ckpt["ema_model"][k], ckpt["model"][k]) for k in ckpt["model"] if "weight" in k)
    assert summary["steps"] == 3
    # the spectrum dynamics at every step: the top-5 eigenvalues, their condition number and entropy
    for r in rows:
        top = r["top_eigenvalues"]
        assert len(top) == 5 and top == sorted(top, reverse=True) and top == r["spectrum"][:5]
        assert r["condition_topk"] == pytest.approx(top[0] / top[4])
        assert 0 < r["entropy_topk"] <= math.log(5) + 1e-12
    assert summary["spectrum_topk"] == 5 and summary["condition_topk"] == rows[-1]["condition_topk"]
    assert summary["entropy_topk"] == rows[-1]["entropy_topk"]
    assert summary["eigenvalue_saturation_step"] == saturation_step(rows, 5) in (1, 2, 3)
    assert (tmp_path / "mc" / "spectrum_topk.png").stat().st_size > 0
    print(f"3 steps: condition number lambda_1/lambda_5 {[round(r['condition_topk'], 2) for r in rows]}, "
          f"lambda_5 saturated at step {summary['eigenvalue_saturation_step']}")


def test_intl_keeps_the_top14_condition_number_far_below_barlow_twins(tiny_synthetic, tmp_path):
    """FroSSL's Figure-3 quantities on a real run: the same 9 steps (network, data, seed) with INTL and with
    Barlow Twins (no whitening). Measured 2026-12 (seeds 0/1/2, 24 steps): INTL's lambda_1/lambda_14 stays
    at 10-240, Barlow Twins' at 7e3-3e7 (its projections collapse at this scale: effective rank about 1);
    at step 9 the ratio was at least 1400. The test asks for 100."""
    from pretrain.train import run

    got = {}
    for method in ("intl", "barlow_twins"):
        cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / method, f"method={method}",
                                              "optim.batch_size=32", "optim.epochs=3", "train.spectrum_every=3",
                                              "train.ckpt_every_steps=0"))
        summary = run(cfg)
        rows = [r for r in read_metrics(tmp_path / method) if "condition_topk" in r]
        assert [r["step"] for r in rows] == [3, 6, 9] and all(len(r["top_eigenvalues"]) == 14 for r in rows)
        got[method] = summary
        conds = [float(f"{r['condition_topk']:.3g}") for r in rows]
        print(f"{method}: lambda_1/lambda_14 {conds}, entropy of the "
              f"top 14 {[round(r['entropy_topk'], 2) for r in rows]} (log 14 = {math.log(14):.2f}), "
              f"lambda_14 saturated at step {summary['eigenvalue_saturation_step']}")
    intl, bt = got["intl"], got["barlow_twins"]
    assert bt["condition_topk"] > 100 * intl["condition_topk"]
    assert intl["entropy_topk"] > bt["entropy_topk"] + 0.5  # measured 1.98-2.14 against 0.01-0.19
