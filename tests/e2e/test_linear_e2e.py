"""Linear evaluation end to end: pretrained beats random init, the frozen check catches a trainable backbone,
resume, 2 gloo processes (the tiny and the default embedded sets)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from common.backbone_weights import file_sha256
from stage_fixtures import free_port, linear_cfg, random_backbone_file
from transfer import classification as C
from transfer import linear


def test_frozen_check_fails_when_the_backbone_is_made_trainable(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(linear, "freeze_backbone", lambda model: None)  # every parameter trainable
    with pytest.raises(C.FrozenBackboneError, match="backbone changed"):
        linear.run(linear_cfg(tiny_synthetic, tmp_path / "thawed", "model.arch=resnet18", "optim.epochs=1"))
    assert not (tmp_path / "thawed" / "results.json").exists()
    assert not (tmp_path / "thawed" / "COMPLETE").exists()


def _killed_at_epoch(monkeypatch, epoch: int) -> None:
    """The job dies in the validation pass of ``epoch`` (after ``epoch - 1`` checkpointed epochs)."""
    real, calls = C.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "evaluate", evaluate)


def test_resume_continues_and_a_complete_run_returns_at_once(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "resume"
    cfg = ("model.arch=resnet18", "optim.epochs=2")
    with pytest.MonkeyPatch.context() as mp_:
        _killed_at_epoch(mp_, 2)
        with pytest.raises(KeyboardInterrupt):
            linear.run(linear_cfg(tiny_synthetic, run_dir, *cfg))
    saved = torch.load(run_dir / "last.pth", weights_only=False)
    assert saved["epoch"] == 1 and saved["format"] == C.CLASSIFIER_FORMAT
    assert set(saved["model"]) == {"weight", "bias"}  # linear eval checkpoints only the classifier
    assert not (run_dir / "COMPLETE").exists()
    second = linear.run(linear_cfg(tiny_synthetic, run_dir, *cfg))  # resubmitted: resumes from last.pth
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == saved["history"][0]
    assert second["steps"] == 2 * saved["step"]
    third = linear.run(linear_cfg(tiny_synthetic, run_dir, *cfg))
    assert third["already_complete"] and third["top1"] == second["top1"]


def test_resubmit_with_other_weights_or_config_is_refused_and_stale_results_are_not_complete(
        tiny_synthetic, tmp_path, monkeypatch):
    a = random_backbone_file(tmp_path / "a.pth", seed=1)
    b = random_backbone_file(tmp_path / "b.pth", seed=2)
    run_dir = tmp_path / "run"
    short = ("optim.epochs=2", "train.max_steps_per_epoch=1")
    with monkeypatch.context() as mp_:
        _killed_at_epoch(mp_, 2)
        with pytest.raises(KeyboardInterrupt):
            linear.run(linear_cfg(tiny_synthetic, run_dir, f"weights={a}", *short))
    config_before = (run_dir / "config.yaml").read_text()
    refused = []
    with pytest.raises(C.StaleRunError, match=r"computed from .*a\.pth .* but the weights now are .*b\.pth") as e:
        linear.run(linear_cfg(tiny_synthetic, run_dir, f"weights={b}", *short))
    refused.append(str(e.value))
    with pytest.raises(C.StaleRunError, match=r"another config \(optim.base_lr: 0.02 -> 0.5\)") as e:
        linear.run(linear_cfg(tiny_synthetic, run_dir, f"weights={a}", "optim.base_lr=0.5", *short))
    refused.append(str(e.value))
    assert (run_dir / "config.yaml").read_text() == config_before  # nothing in the folder rewritten
    assert torch.load(run_dir / "last.pth", weights_only=False)["epoch"] == 1
    done = linear.run(linear_cfg(tiny_synthetic, run_dir, f"weights={a}", "data.workers=0", *short))
    assert done["source"]["sha256"] == file_sha256(a) and done["source"]["path"] == str(a.resolve())
    # The checkpoint changes under the finished evaluation (the pretraining went on): not "already complete".
    b.replace(a)
    with pytest.raises(C.StaleRunError, match="the checkpoint changed") as e:
        linear.run(linear_cfg(tiny_synthetic, run_dir, f"weights={a}", *short))
    refused.append(str(e.value))
    print(f"\nrefused {len(refused)} of 3 mismatching resubmissions: " + " | ".join(r[:90] for r in refused))
    assert len(refused) == 3


def _linear_worker(rank, world, port, data_root, run_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from common.distributed import cleanup

    torch.set_num_threads(1)
    out = linear.run(linear_cfg(Path(data_root), Path(run_dir), "model.arch=resnet18", "optim.epochs=1"))
    assert (out is not None) == (rank == 0)
    cleanup()


def test_linear_two_gloo_processes(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "ddp"
    mp.spawn(_linear_worker, args=(2, free_port(), str(tiny_synthetic), str(run_dir)), nprocs=2, join=True)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["world_size"] == 2 and res["n_val"] == 40 and res["frozen_backbone_check"] == "passed"
    assert res["provenance"]["world_size"] == 2 and res["provenance"]["attempts"] == 1
    assert json.loads((run_dir / "COMPLETE").read_text())["provenance"] == res["provenance"]
    assert res["steps"] == 3  # 120 images / global batch 40
