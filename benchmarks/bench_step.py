"""Step overhead: one full INTL training step against the same step with a trivial loss.

The step is what the engine runs (``pretrain.model.SSLNetwork``: ResNet + the paper's 3 x 8192
projector, ``pretrain.optim.build_optimizer``: SGD momentum 0.9, wd 1e-5; ``pretrain.methods.build_method``
for the objective): forward of both views, loss, backward, optimizer step. The trivial loss is the MSE
between the two projections (no whitening, no trace loss), so the difference is what INTL's objective
costs. Small images and batch on CPU (the paper's shapes would take minutes per step here); the
relative overhead is what carries over, and it only shrinks at the paper's batch (see the README).
Peak RSS is measured per variant after resetting the kernel's high-water mark.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import Row, interleaved, peak_rss_mb, reset_peak_rss
from pretrain.methods import build_method
from pretrain.model import SSLNetwork
from pretrain.optim import build_optimizer

NAME = "step"


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, arch: str = "resnet50", image: int = 64,
        batch: int = 16, projector: int = 8192, log=print) -> list[Row]:
    if quick:
        arch, image, batch, projector = "resnet18", 32, 8, 64
    torch.manual_seed(0)
    net = SSLNetwork(arch, [projector] * 3)
    net.train()
    opt = build_optimizer(net, lr=1e-3, momentum=0.9, weight_decay=1e-5)
    objective = build_method({"name": "intl"}, global_batch=batch)
    views = [torch.randn(batch, 3, image, image) for _ in range(2)]

    def make_step(loss_fn):
        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(views))
            loss.backward()
            opt.step()
        return step

    def trivial(z):
        return (z[0] - z[1]).pow(2).mean()

    def intl(z):
        return objective(list(z))["loss"]

    case = f"{arch} {image}px batch {batch} x 2 views, projector 3x{projector}"
    fns = {"trivial loss (MSE of projections)": make_step(trivial), "INTL loss (IterNorm + trace)": make_step(intl)}
    log(f"[step] {case}: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters")
    times = interleaved(fns, warmup, repeats, progress=lambda m: log(f"[step] {case}: {m}"))
    peaks = {}
    resettable = reset_peak_rss()
    for name, fn in fns.items():
        reset_peak_rss()
        fn()
        peaks[name] = round(peak_rss_mb(), 1)
    base = next(iter(fns))
    rows = []
    for name, ts in times.items():
        rows.append(Row(NAME, case, name, "ms/step", [1000 * t for t in ts], baseline=None if name == base else base,
                        extra={"peak_rss_mb": peaks[name], "peak_rss_per_variant": resettable}))

    # The objective alone (the part that differs), for scale: projections detached from the network.
    z = [torch.randn(batch, projector, requires_grad=True) for _ in range(2)]

    def loss_only(fn):
        def run():
            for t in z:
                t.grad = None
            fn(z).backward()
        return run

    lcase = f"objective alone, 2 views {batch} x {projector}"
    ltimes = interleaved({"trivial loss": loss_only(trivial), "INTL loss": loss_only(intl)}, warmup, repeats)
    for name, ts in ltimes.items():
        rows.append(Row(NAME, lcase, name, "ms (fwd+bwd)", [1000 * t for t in ts],
                        baseline=None if name == "trivial loss" else "trivial loss"))
    # INTL's overhead in % of the step. Two estimates: the difference of the full steps (exact but within
    # the noise of a shared machine when the objective is tiny), and the difference of the objectives alone
    # over the trivial step (robust to that noise).
    step_base = statistics.median(times[base])
    step_intl = statistics.median(times["INTL loss (IterNorm + trace)"])
    obj = statistics.median(ltimes["INTL loss"]) - statistics.median(ltimes["trivial loss"])
    rows[1].extra.update(overhead_pct_steps=round(100 * (step_intl - step_base) / step_base, 2),
                         overhead_pct_objective=round(100 * obj / step_base, 2))
    log(f"[step] INTL overhead: {rows[1].extra['overhead_pct_objective']}% of the step (objectives alone), "
        f"{rows[1].extra['overhead_pct_steps']}% (full steps, +- noise)")
    return rows
