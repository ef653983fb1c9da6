"""Faults of the pretraining engine that used to leave something silently wrong (issue 21): a skipped
non-finite batch, a diverged run's checkpoint, a torn metrics line, stale temporary checkpoints and a
changed schedule on resume. Each trains a few steps of the tiny ResNet-18 run."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import LAST_NAME, load_checkpoint
from common.runlog import read_metrics
from stage_fixtures import build_engine, compose_pretrain, nan_loss_at, tiny_overrides


def _state(engine) -> dict:
    """Every parameter and buffer of the online and the EMA network, copied."""
    return {f"{who}.{k}": v.detach().clone() for who, m in (("online", engine.net), ("ema", engine.target))
            for k, v in m.state_dict().items()}


def test_skipped_step_leaves_every_parameter_and_buffer_bit_identical(tiny_synthetic, tmp_path, monkeypatch):
    from pretrain import engine as E

    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "train.on_nonfinite=skip",
                                          "method.ema=true", "train.max_steps=3"))
    engine = build_engine(cfg)
    assert engine.target is not None
    nan_loss_at(engine, bad_step=1)
    seen = {}
    step = E.train_step

    def spy(*a, **kw):
        before = _state(engine)
        res = step(*a, **kw)
        seen[engine.step] = (before, _state(engine), res.finite)
        return res

    monkeypatch.setattr(E, "train_step", spy)
    summary = engine.fit()
    assert summary["nonfinite_skips"] == 1
    before, after, finite = seen[1]
    assert not finite
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    buffers = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    print(f"skipped step: {len(before)} tensors compared ({len(buffers)} batch-norm buffers), {len(changed)} changed")
    assert changed == []
    ok_before, ok_after, _ = seen[2]  # the next, finite step does change the batch-norm statistics
    assert any(not torch.equal(ok_before[k], ok_after[k]) for k in buffers)


def test_diverged_skip_run_never_writes_a_nonfinite_checkpoint(tiny_synthetic, tmp_path):
    from pretrain.engine import NonFiniteLossError

    # beta=1e30: the first step is finite but throws the weights to ~1e29; every later loss is NaN.
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "method.beta=1e30",
                                          "train.on_nonfinite=skip", "optim.epochs=10", "train.max_steps=30",
                                          "train.ckpt_every_steps=5", "train.log_every=5"))
    engine = build_engine(cfg)
    with pytest.raises(NonFiniteLossError) as err:
        engine.fit()
    msg = str(err.value)
    ckpt = load_checkpoint(tmp_path / "run" / LAST_NAME)
    bad = [k for part in ("model", "ema_model") for k, v in (ckpt[part] or {}).items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    print(f"diverged run: {engine.nonfinite_skips} batches skipped, checkpoint at step {ckpt['step']} holds "
          f"{len(bad)} non-finite tensors; {msg}")
    assert bad == []
    assert f"(step {ckpt['step']}) is intact" in msg and "the run has diverged" in msg
    assert "on_nonfinite=skip to skip" not in msg  # it is the mode that just failed


def test_stop_before_the_first_checkpoint_says_there_is_none(tiny_synthetic, tmp_path):
    from pretrain.engine import NonFiniteLossError

    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "run", "train.max_steps=3"))
    engine = build_engine(cfg)
    nan_loss_at(engine, bad_step=0)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet") as err:
        engine.fit()
    assert "step None" not in str(err.value) and "is intact" not in str(err.value)


def _tb_steps(run_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_after_a_torn_metrics_line_logs_every_step_once(tiny_synthetic, tmp_path):
    from pretrain.engine import NonFiniteLossError

    run_dir = tmp_path / "run"
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, run_dir, "train.max_steps=5", "train.ckpt_every_steps=2"))
    first = build_engine(cfg)
    nan_loss_at(first, bad_step=3)  # steps 1-3 logged, checkpoint at 2, stop at step 4
    with pytest.raises(NonFiniteLossError):
        first.fit()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "time": 17.0, "loss": 0.12')  # what a kill during a write leaves
    summary = build_engine(cfg).fit()
    assert summary["steps"] == 5
    rows = [r["step"] for r in read_metrics(run_dir) if "loss" in r]  # (the monitor adds a row at the last step)
    tb = _tb_steps(run_dir, "loss")
    print(f"after the torn line and the resume from step 2: metrics.jsonl steps {rows}, TensorBoard steps {tb}")
    assert rows == [1, 2, 3, 4, 5]
    assert tb == [1, 2, 3, 4, 5]


def test_stale_temporary_checkpoints_are_removed_at_start_and_end(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".last.k1ll3d.tmp.pth"  # the name atomic_path gives last.pth's temporary
    stale.write_bytes(b"\0" * 1024)
    other = run_dir / "notes.tmp.pth"  # not one of ours: kept
    other.write_bytes(b"x")
    engine = build_engine(compose_pretrain(tiny_overrides(tiny_synthetic, run_dir, "train.max_steps=2",
                                                     "train.ckpt_every_steps=1")))
    save = engine.save
    left_during_run = []

    def save_then_die_leftover(*a, **kw):
        save(*a, **kw)
        if not kw.get("finished"):  # as if a later write had been killed halfway
            left = run_dir / f".last.mid{engine.step}.tmp.pth"
            left.write_bytes(b"\0" * 1024)
            left_during_run.append(left)

    engine.save = save_then_die_leftover
    engine.fit()
    left = sorted(p.name for p in run_dir.glob(".last.*"))
    print(f"stale temporaries: 1 before the run, {len(left_during_run)} left during it, {len(left)} after it")
    assert left == [] and not stale.exists() and other.exists() and left_during_run


def test_resume_with_another_max_steps_is_refused_naming_both(tiny_synthetic, tmp_path):
    from pretrain.engine import NonFiniteLossError, ResumeError
    from pretrain.train import run

    run_dir = tmp_path / "run"
    first = build_engine(compose_pretrain(tiny_overrides(tiny_synthetic, run_dir, "train.max_steps=4",
                                                    "train.ckpt_every_steps=1")))
    nan_loss_at(first, bad_step=2)  # an unfinished run with its checkpoint at step 2
    with pytest.raises(NonFiniteLossError):
        first.fit()
    before = (run_dir / LAST_NAME).read_bytes()
    with pytest.raises(ResumeError, match=r"schedule of 4 steps.*train\.max_steps=4.*gives 6 .*train\.max_steps=6.*"
                                          r"new run folder") as err:
        run(compose_pretrain(tiny_overrides(tiny_synthetic, run_dir, "train.max_steps=6")))
    print(f"refused: {err.value}")
    assert (run_dir / LAST_NAME).read_bytes() == before
    assert run(compose_pretrain(tiny_overrides(tiny_synthetic, run_dir, "train.max_steps=4",
                                               "train.ckpt_every_steps=1")))["steps"] == 4
