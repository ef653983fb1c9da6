"""train.compile=true: torch.compile (inductor, C++ kernels on CPU) of the network takes the same steps as eager,
the monitor's probe still sees the backbone, and the checkpoint has the plain keys, so an eager run resumes it.

Kept tiny: torch.compile's first call compiles every kernel of the forward and the backward (measured here:
~75 s of CPU for this network without a kernel cache, a ResNet-18 takes many minutes), so the engine trains a
one-conv backbone + the paper's projector (``build_network`` patched), on the tiny synthetic set.

Tolerance: the compiled kernels fuse and reorder float32 reductions, so losses differ by float32 round-off;
IterNorm amplifies such differences over steps (tests/e2e/test_engine_distributed.py measured ~1e-3 relative
after two steps for two summation orders). The first step's loss (no update yet) must agree to 1e-5 relative,
every later one to 1e-3; a real difference (a wrong graph, a dropped batch-norm update) moves them by far more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from common.checkpoint import LAST_NAME, load_checkpoint
from common.runlog import read_metrics
from pretrain import engine as E
from pretrain.model import build_projector
from stage_fixtures import build_engine, compose_pretrain, nan_loss_at, tiny_overrides


class _TinyNetwork(nn.Module):
    """SSLNetwork's contract (``backbone`` with ``feature_dim``, ``projector``, a list of views in) at toy size."""

    def __init__(self, projector):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.backbone.feature_dim = 8
        self.projector = build_projector(8, projector)

    def forward(self, views):
        return [self.projector(self.backbone(v)) for v in views]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture
def tiny_network(monkeypatch):
    monkeypatch.setattr(E, "build_network", lambda cfg_model: _TinyNetwork(list(cfg_model.projector)))


def test_compiled_network_trains_the_same_steps_and_writes_a_checkpoint_eager_resumes(tiny_synthetic, tmp_path,
                                                                                         tiny_network):
    def cfg(run, *extra):
        return compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / run, "train.max_steps=4",
                                               "train.ckpt_every_steps=2", "model.projector=[32,32]", *extra))

    eager = build_engine(cfg("eager"))
    eager.fit()
    compiled = build_engine(cfg("compiled", "train.compile=true"))
    assert compiled.model is not compiled.net and compiled.net.__class__ is _TinyNetwork
    nan_loss_at(compiled, bad_step=2)  # steps 1-2 compiled, checkpoint at 2, then a stop at step 3
    counters.clear()
    with pytest.raises(E.NonFiniteLossError):
        compiled.fit()
    graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    assert graphs >= 1 and not breaks, (graphs, breaks)  # dynamo captured the network whole (the probe's hook too)
    ckpt = load_checkpoint(tmp_path / "compiled" / LAST_NAME)
    eager_keys = set(load_checkpoint(tmp_path / "eager" / LAST_NAME)["model"])
    assert ckpt["step"] == 2 and set(ckpt["model"]) == eager_keys
    assert not any("_orig_mod" in k for k in ckpt["model"])
    resumed = build_engine(cfg("compiled"))  # the same run folder, eager: steps 3-4 from the compiled checkpoint
    resumed.fit()

    want, got = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    rel = {s: abs(got[s] - want[s]) / abs(want[s]) for s in want}
    probe = [r for r in read_metrics(tmp_path / "compiled") if "probe_train_top1" in r]
    print(f"losses eager {want}, compiled (1-2) then eager resume (3-4) {got}; relative differences {rel}; "
          f"probe rows in the compiled run {len(probe)}; {graphs} graph(s) compiled, no graph break")
    assert sorted(got) == [1, 2, 3, 4]
    assert rel[1] < 1e-5 and max(rel.values()) < 1e-3
    assert probe and all(0 <= r["probe_train_top1"] <= 100 for r in probe)


def test_compile_on_cpu_without_a_cxx_compiler_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(E.shutil, "which", lambda name: None)
    with pytest.raises(E.ConfigError, match=r"train.compile=true on CPU needs a C\+\+ compiler.*train.compile=false"):
        E.check_compile_support(torch.device("cpu"))
    E.check_compile_support(torch.device("cuda"))  # not checked on GPUs (inductor writes Triton kernels there)


def _two_process_worker(rank: int, world: int, port: int, data_root: str, out: str) -> None:
    import functools
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pathlib import Path

    from common.distributed import cleanup

    E.build_network = lambda cfg_model: _TinyNetwork(list(cfg_model.projector))
    # dynamo + AOTAutograd without inductor's C++ code generation: what fails with DDP and SyncBN is dynamo's
    # DDPOptimizer, and the kernels are the single-process test's business
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    try:
        for name, extra in (("eager", ()), ("compiled", ("train.compile=true",))):
            engine = build_engine(compose_pretrain(tiny_overrides(
                Path(data_root), Path(out) / name, "train.max_steps=3", "model.projector=[32,32]", *extra)))
            engine.fit()
    finally:
        cleanup()


def test_compile_with_ddp_and_sync_batchnorm_over_two_processes_takes_the_same_steps(tiny_synthetic, tmp_path):
    """torch.compile of the DDP-wrapped network holding the cross-process batch norm: torch 2.3's DDPOptimizer
    refuses the graph (the BN's collective is a higher-order op in it), so the engine turns the DDP graph split
    off; the two processes then train the same steps as eager."""
    import torch.multiprocessing as mp

    from stage_fixtures import free_port

    mp.start_processes(_two_process_worker, args=(2, free_port(), str(tiny_synthetic), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    want, got = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    print(f"2 processes, losses eager {want}, compiled {got}")
    assert sorted(got) == [1, 2, 3] and all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in want)
