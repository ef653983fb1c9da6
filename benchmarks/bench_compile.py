"""``train.compile``: a training step with the network under ``torch.compile`` against the same step eager.

The step is the engine's (``pretrain.engine.train_step``: forward of both views, the INTL objective, backward,
SGD): the network eager (the baseline) and ``torch.compile(network)`` (what ``train.compile=true`` does), each
with its own copy of the same initial weights. The first compiled call compiles (minutes on CPU): it is timed
on its own (``compile_seconds``) and left out of the repeats. Second case: the objective alone (2 views of the
paper's channel-whitening shape, forward + backward) eager and compiled, to decide whether compiling it helps.

On CPU inductor generates C++ kernels (gcc); ``--quick`` (the smoke test) uses the ``aot_eager`` backend instead
(dynamo and AOTAutograd without code generation), so the benchmark's code runs in seconds and cannot rot.
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.common import Row, interleaved
from pretrain.engine import train_step
from pretrain.methods import build_method
from pretrain.model import SSLNetwork
from pretrain.optim import build_optimizer

NAME = "compile"
EAGER, COMPILED = "eager", "torch.compile"


def _timed_first_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, arch: str = "resnet18", image: int = 64,
        batch: int = 32, projector: int = 2048, objective_shape: tuple[int, int] = (256, 8192), log=print) -> list[Row]:
    backend = "inductor"
    if quick:
        arch, image, batch, projector, objective_shape, backend = "resnet18", 16, 8, 32, (16, 64), "aot_eager"
    torch.manual_seed(0)
    eager_net = SSLNetwork(arch, [projector] * 3)
    compiled_net = copy.deepcopy(eager_net)
    objective = build_method({"name": "intl"}, global_batch=batch)
    views = [torch.randn(batch, 3, image, image) for _ in range(2)]
    model = torch.compile(compiled_net, backend=backend)

    def make_step(network, module):
        optimizer = build_optimizer(network, lr=1e-3, momentum=0.9, weight_decay=1e-5)

        def step():
            res = train_step(module, objective, optimizer, views)
            assert res.finite
        return step

    fns = {EAGER: make_step(eager_net, eager_net), COMPILED: make_step(compiled_net, model)}
    case = f"{arch} {image}px batch {batch} x 2 views, projector 3x{projector}, INTL step"
    log(f"[compile] {case}: compiling ({backend}; the first call, minutes with inductor on CPU)")
    compile_s = _timed_first_call(fns[COMPILED])
    log(f"[compile] {case}: compiled in {compile_s:.0f}s")
    times = interleaved(fns, warmup, repeats, progress=lambda m: log(f"[compile] {case}: {m}"))
    rows = [Row(NAME, case, name, "ms/step", [1000 * t for t in ts], baseline=None if name == EAGER else EAGER,
                extra={"backend": backend, **({"compile_seconds": round(compile_s, 1)} if name == COMPILED else {})})
            for name, ts in times.items()]

    m, d = objective_shape
    z = [torch.randn(m, d, requires_grad=True) for _ in range(2)]
    big = build_method({"name": "intl"}, global_batch=m)
    compiled_objective = torch.compile(big, backend=backend)

    def objective_step(fn):
        def go():
            for t in z:
                t.grad = None
            fn(z)["loss"].backward()
        return go

    ofns = {EAGER: objective_step(big), COMPILED: objective_step(compiled_objective)}
    ocase = f"INTL objective alone, 2 views {m} x {d} (channel whitening)"
    ocompile_s = _timed_first_call(ofns[COMPILED])
    otimes = interleaved(ofns, warmup, repeats, progress=lambda msg: log(f"[compile] {ocase}: {msg}"))
    rows += [Row(NAME, ocase, name, "ms (fwd+bwd)", [1000 * t for t in ts], baseline=None if name == EAGER else EAGER,
                 extra={"backend": backend, **({"compile_seconds": round(ocompile_s, 1)} if name == COMPILED else {})})
             for name, ts in otimes.items()]
    return rows
