"""The pretraining monitor (pretrain/monitor.py) in real runs of the engine: the online probe sends no
gradient into the backbone, the k-NN monitor's number is the offline ``transfer.knn`` number of the same
checkpoint, and one or two processes give the same monitor figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import LAST_NAME, load_checkpoint
from common.runlog import read_metrics
from stage_fixtures import build_engine, compose_pretrain, free_port, knn_cfg, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
MONITOR_KEYS = ("probe_val_top1", "knn_top1", "knn_top5")


def _monitor_rows(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in ("step", *MONITOR_KEYS) if k in r} for r in read_metrics(run_dir)
            if any(k in r for k in MONITOR_KEYS)]


def test_probe_sends_no_gradient_into_the_backbone(tiny_synthetic, tmp_path):
    states = {}
    for probe in ("true", "false"):
        cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / probe, "train.max_steps=3",
                                              f"train.online_probe={probe}", "train.knn_every=0"))
        engine = build_engine(cfg)
        assert (engine.probe is not None) == (probe == "true")
        engine.fit()
        states[probe] = engine.net.state_dict()
        if probe == "true":
            rows = [r for r in read_metrics(tmp_path / probe) if "loss" in r]
            assert all("probe_train_top1" in r for r in rows), rows  # logged in every row (log_every=1)
            probe_state = load_checkpoint(tmp_path / probe / LAST_NAME)["probe"]
            assert probe_state["head"]["1.weight"].abs().sum() > 0  # the probe itself did learn
    on, off = states["true"], states["false"]
    assert on.keys() == off.keys()
    differ = [k for k in on if not torch.equal(on[k], off[k])]
    print(f"{len(on)} tensors of the network compared with the probe on and off: {len(differ)} differ")
    assert not differ


def test_knn_monitor_equals_the_offline_knn_of_the_same_checkpoint(tiny_synthetic, tmp_path):
    from pretrain.train import run as pretrain
    from transfer.knn import run as knn

    run_dir = tmp_path / "pre"
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, run_dir, "train.max_steps=4", "train.knn_every=1",
                                          "data.eval_resize=32", "data.eval_crop=32"))
    summary = pretrain(cfg)
    monitor = _monitor_rows(run_dir)[-1]
    assert monitor["step"] == 4 and summary["knn_top1"] == monitor["knn_top1"]
    offline = knn(knn_cfg(tiny_synthetic, tmp_path / "knn", f"weights={run_dir / LAST_NAME}", "model.arch=null"))
    weighted = offline["weighted"]
    print(f"k-NN (k=20, T=0.07) at step 4: monitor {monitor['knn_top1']:.2f} / {monitor['knn_top5']:.2f}, "
          f"transfer.knn {weighted['top1']:.2f} / {weighted['top5']:.2f}")
    assert weighted["k"] == 20 and monitor["knn_top1"] == pytest.approx(weighted["top1"], abs=1e-9)
    assert monitor["knn_top5"] == pytest.approx(weighted["top5"], abs=1e-9)
    assert (run_dir / "monitor.png").stat().st_size > 0


_ONE_PASS = """
import json, os, sys
from common.distributed import cleanup, init_distributed
from common.config import compose_config
from common.checkpoint import load_checkpoint
from pretrain.train import validate_config
from pretrain.engine import PretrainEngine
from pretrain import monitor

cfg = validate_config(compose_config("pretrain", sys.argv[2:]), world_size=int(os.environ.get("WORLD_SIZE", "1")))
engine = PretrainEngine(cfg, init_distributed())
ckpt = load_checkpoint(sys.argv[1])
engine.net.load_state_dict(ckpt["model"])
engine.probe.load_state(ckpt["probe"])
row = monitor.evaluate(engine.net.backbone, engine.monitor_sets, engine.probe, True, cfg.train, 0, engine.device)
if engine.info.is_main:
    print("ROW " + json.dumps(row), flush=True)
cleanup()  # every rank leaves the process group together (gloo aborts a process that exits while a peer is in it)
"""


def test_one_and_two_processes_give_the_same_monitor_figures(tiny_synthetic, tmp_path):
    """The same checkpoint evaluated by the monitor in one process and in two (each its shard, features
    gathered, probe BN over the global batch): the same probe and k-NN figures."""
    from pretrain.train import run as pretrain

    overrides = tiny_overrides(tiny_synthetic, tmp_path / "pre", "train.max_steps=3", "train.knn_every=1",
                               "train.monitor_batch_size=10")
    pretrain(compose_pretrain(overrides))
    script = tmp_path / "one_pass.py"
    script.write_text(_ONE_PASS)
    rows = {}
    for world in (1, 2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, str(script), str(tmp_path / "pre" / LAST_NAME), *overrides]
        if world == 2:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                   str(free_port()), str(script), *cmd[2:]]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[world] = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ROW "))[4:])
    print(f"monitor figures, 1 process: {rows[1]}; 2 processes: {rows[2]}")
    assert set(rows[1]) >= {"probe_val_top1", "knn_top1", "knn_top5"}
    assert rows[1] == pytest.approx(rows[2], abs=1e-6)


def test_missing_validation_split_turns_the_monitor_off_with_a_warning(tiny_synthetic, tmp_path, caplog):
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "noval", "train.max_steps=2",
                                          "data.val_split=nope", "train.knn_every=1"))
    with caplog.at_level("WARNING", logger="pretrain"):
        engine = build_engine(cfg)
        summary = engine.fit()
    assert "no validation folder" in caplog.text and "data.val_split" in caplog.text
    assert not _monitor_rows(tmp_path / "noval") and "probe_train_top1" in summary
