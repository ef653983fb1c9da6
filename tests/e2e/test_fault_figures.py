"""Fault figures (issue 19): what a pretraining run survives, each test printing its count (the README's
reliability section quotes them, with `pytest tests/e2e/test_fault_figures.py -s`).

Every run is the tiny ResNet-18 of ``tiny_overrides`` for ``STEPS`` steps, checkpointing every 2 steps and at
the epoch end (7 steps per epoch, with the ``epoch_1.pth`` snapshot): checkpoints at steps 2, 4, 6, 7, 8, 10
and the final one. Runs are forked from the test process (real processes that a SIGKILL ends with no clean-up
at all, without paying the imports again); the faults are injected in the child only:

- SIGKILL after a step is logged, or while ``last.pth``'s temporary file is being written (``torch.save``
  given a file that kills the process after a chosen number of bytes);
- a full disk: a tmpfs mounted by the test, filled up by a file at a chosen point;
- an unreadable ``last.pth`` (cut, garbage) and corrupt images, made between runs.

The uninterrupted run (``reference``) is run the same way, once per module.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import LAST_NAME, load_checkpoint, previous_path
from common.runlog import read_metrics
from stage_fixtures import compose_pretrain, tiny_overrides

SEED = int(os.environ.get("INTL_FAULT_SEED", "19"))  # the random kill steps: the same ones every run
STEPS = 12
COMMON = ("optim.epochs=2", f"train.max_steps={STEPS}", "train.ckpt_every_steps=2", "train.keep_every_epochs=1",
          "train.online_probe=false", "train.knn_every=0")
CHECKPOINT_STEPS = (2, 4, 6, 7, 8, 10)  # before the final one
FORK = multiprocessing.get_context("fork")


# ------------------------------------------------------------------------------------ the forked runs
class _KillAfter:
    """A file for ``torch.save`` that SIGKILLs the process once ``limit`` bytes have gone to disk."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written >= self.limit:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def flush(self) -> None:
        self.f.flush()


def _fill(disk: Path, leave: int = 0) -> None:
    """Writes zeros into ``disk``/filler until the disk is full, then gives back ``leave`` bytes."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for chunk in (1 << 16, 1):
        try:
            while True:
                os.write(fd, b"\0" * chunk)
        except OSError:
            pass
    os.close(fd)
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)


def _child(run_dir: Path, data: Path, extra: tuple, notes: Path, faults: dict) -> None:
    """In the forked process: the faults, then the pretraining stage's ``run``."""
    from common.errors import UserError
    from pretrain.engine import PretrainEngine
    from pretrain.train import run

    log, resume, real_save = PretrainEngine._log, PretrainEngine.resume, torch.save

    def logged(self, *args, **kwargs):
        if self.step == faults.get("fill_before_log"):
            _fill(faults["disk"])
        log(self, *args, **kwargs)
        if self.step == faults.get("kill_after_step"):
            os.kill(os.getpid(), signal.SIGKILL)

    def resumed(self):
        out = resume(self)
        with open(notes / "resumes.txt", "a") as f:
            f.write(f"{self.step}\n")
        return out

    def torch_save(obj, f, *args, **kwargs):  # atomic_torch_save's: f is the temporary file
        step, nbytes = faults.get("kill_writing", (None, 0))
        is_last = isinstance(obj, dict) and not obj.get("snapshot") and Path(f).name.startswith(".last.")
        if is_last and obj.get("step") == step:
            with open(f, "wb") as out:
                real_save(obj, _KillAfter(out, nbytes), *args, **kwargs)
            raise AssertionError(f"the checkpoint of step {step} is smaller than {nbytes} bytes: not killed")
        if is_last and obj.get("step") == faults.get("fill_writing"):
            _fill(faults["disk"], leave=8 << 20)  # the disk fills up while the checkpoint is written
        real_save(obj, f, *args, **kwargs)

    PretrainEngine._log, PretrainEngine.resume = logged, resumed
    torch.save = torch_save
    try:
        run(compose_pretrain(tiny_overrides(data, run_dir, *COMMON, *extra)))
    except UserError as e:
        (notes / "error.txt").write_text(str(e))
        os._exit(2)


def _train(run_dir: Path, data: Path, notes: Path, *extra: str, **faults) -> int:
    """One forked run of the stage in ``run_dir``; its exit code (-9: SIGKILL, 2: a UserError in error.txt)."""
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "error.txt").unlink(missing_ok=True)
    proc = FORK.Process(target=_child, args=(run_dir, data, extra, notes, faults))
    proc.start()
    proc.join(900)
    if proc.exitcode is None:
        proc.kill()
        pytest.fail(f"a run in {run_dir} did not end in 15 minutes")
    return proc.exitcode


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _temporaries(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(".*.tmp*"))


@pytest.fixture(scope="module")
def reference(tiny_synthetic, tmp_path_factory):
    """The uninterrupted run: (its folder, its losses by step)."""
    root = tmp_path_factory.mktemp("reference")
    assert _train(root / "run", tiny_synthetic, root) == 0
    losses = _losses(root / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return root / "run", losses


def _same_model(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------------ the figures
def test_sigkill_at_random_steps_resumes_bit_for_bit(tiny_synthetic, reference, tmp_path):
    ref_dir, want = reference
    rng = random.Random(SEED)
    writes = rng.sample(CHECKPOINT_STEPS, 2)
    steps = rng.sample([s for s in range(1, STEPS) if s not in writes], 3)
    events = sorted([(s, "after step") for s in steps] + [(s, "writing the checkpoint of step") for s in writes])
    full_size = (ref_dir / LAST_NAME).stat().st_size
    run, notes, t0 = tmp_path / "run", tmp_path / "notes", time.time()
    resumed_from, reproduced, hit_writes = [], 0, 0
    for k, (step, where) in enumerate(events):
        if where == "after step":
            code = _train(run, tiny_synthetic, notes, kill_after_step=step)
        else:
            code = _train(run, tiny_synthetic, notes, kill_writing=(step, rng.randint(1 << 12, full_size - 1)))
        assert code == -signal.SIGKILL, f"kill {k} ({where} {step}) did not happen: exit {code}"
        assert not (run / "COMPLETE").exists()
        if where != "after step":
            [partial] = _temporaries(run)  # the killed write's temporary: cut short, last.pth untouched
            kept = load_checkpoint(run / LAST_NAME)["step"] if (run / LAST_NAME).exists() else 0
            hit_writes += 0 < partial.stat().st_size < full_size and kept < step
        got = _losses(run)
        assert sorted(got) == list(range(1, step + 1))
        if k:  # a resumed run: the rows it logged, from its resume step to where it was killed
            start = resumed_from[-1]
            reproduced += all(got[s] == want[s] for s in range(start + 1, step + 1))
        resumed_from.append(int((notes / "resumes.txt").read_text().split()[-1]) if k else 0)
    assert _train(run, tiny_synthetic, notes) == 0  # the last resume runs to the end
    resumed_from.append(int((notes / "resumes.txt").read_text().split()[-1]))
    got = _losses(run)
    reproduced += all(got[s] == want[s] for s in range(resumed_from[-1] + 1, STEPS + 1))
    resumes = len(events)
    print(f"\nSIGKILL at {len(events)} random steps ({hit_writes} during a checkpoint write; seed {SEED}: "
          f"{', '.join(f'{w} {s}' for s, w in events)}); resumed from steps {resumed_from[1:]}: "
          f"{reproduced}/{resumes} resumed runs reproduce the uninterrupted losses bit for bit, and the final "
          f"{STEPS} losses and weights equal the uninterrupted run's; {time.time() - t0:.0f} s")
    assert hit_writes == 2 and reproduced == resumes
    assert got == want and _same_model(run / LAST_NAME, ref_dir / LAST_NAME)
    assert _temporaries(run) == []  # the killed writes' temporaries are removed by the next start


def _cut(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)  # as a full disk or a broken copy leaves it


def _garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(random.Random(SEED).randbytes(size))


def test_unreadable_last_pth_falls_back_and_reproduces_the_losses(tiny_synthetic, reference, tmp_path, monkeypatch,
                                                                 capsys):
    """A run killed after step 11 (last.pth of step 10, last.prev.pth of step 8, epoch_1.pth of step 7); then
    in copies of its folder: last.pth cut to half (resumed by `submit --cluster local --wait`, as a user
    would), last.pth overwritten with garbage, and last.pth and last.prev.pth both cut."""
    ref_dir, want = reference
    t0 = time.time()
    base = tmp_path / "killed"
    assert _train(base, tiny_synthetic, tmp_path / "notes", kill_after_step=11) == -signal.SIGKILL
    assert load_checkpoint(base / LAST_NAME)["step"] == 10 and load_checkpoint(previous_path(base / LAST_NAME))[
        "step"] == 8
    cases = {"last.pth cut to half, resumed by submit": ([_cut], "last.prev.pth", 8),
             "last.pth garbage": ([_garbage], "last.prev.pth", 8),
             "last.pth and last.prev.pth cut": ([_cut, _cut], "epoch_1.pth", 7)}
    ok = 0
    for case, (damages, expected, step) in cases.items():
        run = tmp_path / case.replace(" ", "_").replace(",", "")
        shutil.copytree(base, run)
        for damage, name in zip(damages, (LAST_NAME, previous_path(LAST_NAME).name)):
            damage(run / name)
        if "submit" in case:
            from slurm.submit import main

            monkeypatch.chdir(tmp_path)
            monkeypatch.setenv("INTL_SUBMIT_POLL_S", "1")
            monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job computes with one thread, as the reference
            capsys.readouterr()
            assert main(["pretrain", "--cluster", "local", "--gpus", "1", "--wait",
                         *tiny_overrides(tiny_synthetic, run, *COMMON)]) == 0
            out = capsys.readouterr().out
            said = [ln for ln in out.splitlines() if "checkpoint fallback: resuming from last.prev.pth (step 8)" in ln]
            assert len(said) == 2, out  # submit before queueing, and the job's log line (streamed)
        else:
            assert _train(run, tiny_synthetic, tmp_path / "notes") == 0
        record = next(r["checkpoint_fallback"] for r in read_metrics(run) if "checkpoint_fallback" in r)
        complete = json.loads((run / "COMPLETE").read_text())
        same = _losses(run) == want and _same_model(run / LAST_NAME, ref_dir / LAST_NAME)
        print(f"\n{case}: resumed from {record['resumed_from']} (step {record['step']}), passed over "
              f"{list(record['passed_over'])}; {STEPS} losses bit for bit: {same}")
        assert (record["resumed_from"], record["step"]) == (expected, step)
        assert complete["checkpoint_fallbacks"] == [record]
        ok += same
    print(f"\nunreadable last.pth ({len(cases)} cases: cut, garbage, cut with last.prev.pth cut too): "
          f"{ok}/{len(cases)} resumed from the previous good checkpoint and reproduce the {STEPS} uninterrupted "
          f"losses bit for bit; {time.time() - t0:.0f} s")
    assert ok == len(cases)


@pytest.fixture
def small_disk(tmp_path):
    """A 512 MiB tmpfs (a checkpoint here is ~90 MB: last.pth, last.prev.pth, the snapshot and one being written)
    mounted for the test, unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_stops_naming_the_disk_and_keeps_the_last_good_state(tiny_synthetic, reference, small_disk,
                                                                       tmp_path):
    _, want = reference
    run, notes, t0 = small_disk / "run", tmp_path / "notes", time.time()
    stops = []

    def stopped(**faults) -> str:
        assert _train(run, tiny_synthetic, notes, disk=small_disk, **faults) == 2
        message = (notes / "error.txt").read_text()
        good = load_checkpoint(run / LAST_NAME)["step"] if (run / LAST_NAME).exists() else None
        stops.append((message, good, _temporaries(run)))
        (small_disk / "filler").unlink()  # space freed: the same command resumes
        return message

    _fill(small_disk)  # full before the run starts
    first = stopped()
    stopped(fill_before_log=3)  # between steps 2 and 3: the first write that needs a new block fails
    stopped(fill_writing=6)  # while the checkpoint of step 6 is written
    assert _train(run, tiny_synthetic, notes) == 0
    same = _losses(run) == want
    for message, good, left in stops:
        print(f"\nfull disk: {message}\n  -> last good checkpoint: step {good}; temporaries left: {len(left)}")
    named = sum(f"mounted at {small_disk} (tmpfs" in m and " bytes free " in m and "fix: free space" in m
                for m, _, _ in stops)
    print(f"\nfull disk ({small_disk}, 512 MiB tmpfs) at {len(stops)} points (at the start, between two steps, "
          f"while writing a checkpoint): {named}/{len(stops)} stopped with exit 2 naming the disk and its free "
          f"bytes; last good checkpoint after each: {[g for _, g, _ in stops]}; after freeing space the resumed run "
          f"reproduces the {STEPS} uninterrupted losses bit for bit: {same}; {time.time() - t0:.0f} s")
    assert named == len(stops)
    assert "provenance.json" in first or "config.yaml" in first
    assert f"cannot write {run}/" in stops[1][0]  # metrics.jsonl, TensorBoard's events or last.pth
    assert f"cannot write {run / LAST_NAME}: " in stops[2][0] and "were written before the error" in stops[2][0]
    assert [g for _, g, _ in stops] == [None, 2, 4] and all(left == [] for _, _, left in stops)
    assert same


def test_corrupt_images_are_skipped_and_counted_in_the_metrics(tiny_synthetic, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic / "classification", data / "classification")
    images = sorted((data / "classification" / "train").glob("*/*.jpg"))
    bad = random.Random(SEED).sample(images, 5)
    for k, path in enumerate(bad):  # 2 cut short, 3 overwritten with text
        if k < 2:
            os.truncate(path, path.stat().st_size // 3)
        else:
            path.write_bytes(b"not an image")
    run = tmp_path / "run"
    # 120 images = 3 batches of 40: one epoch reads each image once; two DataLoader workers share the count.
    assert _train(run, data, tmp_path / "notes", "optim.batch_size=40", "train.max_steps=3", "data.workers=2") == 0
    counts = [(r["step"], r["skipped_images"]) for r in read_metrics(run) if "skipped_images" in r]
    listed = [line.split("\t")[1] for line in (run / "unreadable_images.txt").read_text().splitlines()]
    complete = json.loads((run / "COMPLETE").read_text())
    print(f"\ncorrupt images: {len(bad)} of {len(images)} training images (2 cut short, 3 not images), 2 DataLoader "
          f"workers: skipped, counted in metrics.jsonl (skipped_images by step: {counts}), COMPLETE "
          f"skipped_images {complete['skipped_images']}, unreadable_images.txt {len(listed)} files")
    assert counts[-1] == (3, len(bad)) and [c for _, c in counts] == sorted(c for _, c in counts)
    assert complete["skipped_images"] == len(bad) and sorted(listed) == sorted(str(p) for p in bad)
