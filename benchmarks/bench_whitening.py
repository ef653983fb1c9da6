"""Whitening: IterNorm against whitening as practitioners write it, timed and stress-tested on the same matrices.

Methods (``METHODS``; the baselines are in ``benchmarks.baselines``, every ridge / floor relative to the
covariance's scale, because IterNorm is scale-invariant):

- ZCA by ``torch.linalg.eigh``: the textbook form (float32, no epsilon); with a ridge ``Sigma + 1e-4 x mean
  eigenvalue x I`` (Decorrelated BatchNorm's epsilon), float32 and float64; with an eigenvalue floor at
  1e-6 x lambda_max (our ``st_power``: ``pretrain.losses.power_transform``, float64, and the same in float32);
- Cholesky whitening of the shrunk covariance ``(1 - 1e-4) Sigma + 1e-4 x mean eigenvalue x I`` (W-MSE),
  float32 and float64;
- IterNorm T=4 (``pretrain.losses.iternorm``), and for the timing also the paper's computation of the same
  output (``pretrain.losses.iternorm_reference``, the implementation before issue 20).

The INTL objective (``--only objective``, rows ``intl-objective``, channel whitening only): ``intl_loss`` of 2
views from Gram matrices (``fused=True``, ``method.fused=true``: the outputs never formed), the same by whitened
outputs (the default), and the paper's computation (``iternorm_reference``, then ``norm_mse`` and ``trace_loss`` on
the outputs, the baseline), forward + backward, interleaved.

Timing: two views whitened, then the alignment loss ``norm_mse`` of the pair, forward + backward, every method
on the same inputs and loss, interleaved; at the paper's shapes: channel whitening m=256, d=8192 (m x m
covariance) and batch whitening m=256, d=512 / 1024 (``--full``: also 2048) (d x d covariance). The ratio of
each row is its speed over the paper's IterNorm of the same case.

Robustness (paper Appendix D.3): seeded trials on ill-conditioned inputs (``ill_conditioned``): batch
whitening with d > m (a singular covariance), a covariance with repeated eigenvalues (groups of equal ones:
eigh's backward divides by their differences), and a near-collapsed embedding (rank 8 + 1e-4 noise), batch
and channel. For each method and trial: a ``LinAlgError`` (eigh or Cholesky failed), a non-finite output, a
non-finite gradient, else ok, with the largest gradient entry |dL/dz| for a fixed random upstream gradient
(the median and the maximum over the ok trials are reported: how hard the method pushes on the embedding).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from benchmarks.baselines import cholesky_whiten, zca_whiten
from benchmarks.common import Row, interleaved
from common.atomic import save_figure
from pretrain.losses import (
    combine_views,
    intl_beta,
    intl_loss,
    iternorm,
    iternorm_reference,
    norm_mse,
    power_transform,
    trace_loss,
)

NAME = "whitening"
OBJECTIVE = "intl-objective"
ROBUSTNESS = NAME + "-robustness"
F32, F64 = torch.float32, torch.float64
RIDGE, FLOOR, ITERS = 1e-4, 1e-6, 4
ITERNORM = f"IterNorm T={ITERS}"
ITERNORM_REF = f"IterNorm T={ITERS}, the paper's computation"
OBJECTIVE_REF = f"IterNorm T={ITERS} + norm_mse + trace loss, the paper's computation"
OUTCOMES = ("ok", "linalg_error", "nonfinite_output", "nonfinite_grad")

Whiten = Callable[[torch.Tensor, str], torch.Tensor]
# name -> whitening(z, axis); the order is the tables' order
METHODS: dict[str, Whiten] = {
    "ZCA eigh fp32, no eps (textbook)": lambda z, axis: zca_whiten(z, axis),
    f"ZCA eigh fp32, ridge {RIDGE:g} (DBN)": lambda z, axis: zca_whiten(z, axis, eps=RIDGE),
    f"ZCA eigh fp64, ridge {RIDGE:g} (DBN)": lambda z, axis: zca_whiten(z, axis, eps=RIDGE, dtype=F64),
    f"ZCA eigh fp32, floor {FLOOR:g} (st_power)": lambda z, axis: zca_whiten(z, axis, floor=FLOOR),
    f"ZCA eigh fp64, floor {FLOOR:g} (st_power)": lambda z, axis: power_transform(z, 0.5, axis, eps=FLOOR),
    f"Cholesky fp32, ridge {RIDGE:g} (W-MSE)": lambda z, axis: cholesky_whiten(z, axis, RIDGE),
    f"Cholesky fp64, ridge {RIDGE:g} (W-MSE)": lambda z, axis: cholesky_whiten(z, axis, RIDGE, dtype=F64),
    ITERNORM: lambda z, axis: iternorm(z, ITERS, axis),
}
TIMED: dict[str, Whiten] = {**METHODS, ITERNORM_REF: lambda z, axis: iternorm_reference(z, ITERS, axis)}


# ---------------------------------------------------------------------------------------------- timing
def _step(whiten: Whiten, z1: torch.Tensor, z2: torch.Tensor, axis: str) -> Callable[[], None]:
    def run():
        z1.grad = z2.grad = None
        norm_mse(whiten(z1, axis), whiten(z2, axis)).backward()
    return run


def timing(cases, warmup, repeats, log) -> list[Row]:
    rows = []
    for axis, m, d in cases:
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(m, d, generator=g).requires_grad_()
        z2 = (z1.detach() + 0.5 * torch.randn(m, d, generator=g)).requires_grad_()
        case = f"{axis} whitening m={m} d={d}"
        fns = {name: _step(fn, z1, z2, axis) for name, fn in TIMED.items()}
        times = interleaved(fns, warmup, repeats, progress=lambda msg, case=case: log(f"[whitening] {case}: {msg}"))
        for name, ts in times.items():
            rows.append(Row(NAME, case, name, "ms (fwd+bwd, 2 views + norm_mse)", [1000 * t for t in ts],
                            baseline=None if name == ITERNORM_REF else ITERNORM_REF,
                            extra={"axis": axis, "m": m, "d": d}))
        fastest = min(times, key=lambda k: sorted(times[k])[len(times[k]) // 2])
        log(f"[whitening] {case}: fastest {fastest}")
    return rows


def _objective_steps(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The INTL objective of two channel-whitened views three ways; the paper's computation is the baseline."""
    beta = intl_beta(z1.shape[0], z1.shape[1])

    def papers() -> torch.Tensor:
        outs = [iternorm_reference(z, ITERS, "channel") for z in (z1, z2)]
        return combine_views(outs, None, lambda a, b: {"align": norm_mse(a, b)},
                             lambda z: {"trace": beta * trace_loss(z, "channel")})["loss"]

    variants = {
        "intl_loss from Gram matrices (fused=True)": lambda: intl_loss([z1, z2], iters=ITERS, fused=True)["loss"],
        "intl_loss by whitened outputs (the default)": lambda: intl_loss([z1, z2], iters=ITERS)["loss"],
        OBJECTIVE_REF: papers,
    }

    def step(fn):
        def run():
            z1.grad = z2.grad = None
            fn().backward()
        return run
    return {name: step(fn) for name, fn in variants.items()}


def objective_timing(cases, warmup, repeats, log) -> list[Row]:
    rows = []
    for m, d in cases:
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(m, d, generator=g).requires_grad_()
        z2 = (z1.detach() + 0.5 * torch.randn(m, d, generator=g)).requires_grad_()
        case = f"INTL objective, 2 views, channel whitening m={m} d={d}"
        times = interleaved(_objective_steps(z1, z2), warmup, repeats,
                            progress=lambda msg, case=case: log(f"[{OBJECTIVE}] {case}: {msg}"))
        for name, ts in times.items():
            rows.append(Row(OBJECTIVE, case, name, "ms (fwd+bwd)", [1000 * t for t in ts],
                            baseline=None if name == OBJECTIVE_REF else OBJECTIVE_REF, extra={"m": m, "d": d}))
    return rows


# ---------------------------------------------------------------------------------------------- robustness
def _spectrum_data(eigs: torch.Tensor, samples: int, g: torch.Generator) -> torch.Tensor:
    """samples x len(eigs) data whose batch covariance (centred, / (samples - 1)) has exactly ``eigs``."""
    n = len(eigs)
    a = torch.randn(samples, n, generator=g, dtype=F64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (math.sqrt(samples - 1) * (q * eigs.sqrt()) @ u.T).float()


def ill_conditioned(kind: str, m: int, d: int, seed: int, axis: str = "batch") -> torch.Tensor:
    """An m x d float32 input whose covariance along ``axis`` is ill-conditioned in the way ``kind`` says.

    gaussian: full-rank data, singular only because d > m (batch whitening); collapsed: a rank-8 embedding +
    1e-4 noise (what a collapsing projector produces); repeated: the covariance along ``axis`` has four groups
    of equal eigenvalues (4, 2, 1, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, d, generator=g)
    if kind == "collapsed":
        low = torch.randn(m, 8, generator=g) @ torch.randn(8, d, generator=g)
        return low + 1e-4 * torch.randn(m, d, generator=g)
    if kind == "repeated":
        n, samples = (d, m) if axis == "batch" else (m, d)
        if n % 4 or samples <= n:
            raise ValueError(f"repeated eigenvalues need a covariance size ({n}) divisible by 4 and below {samples}")
        eigs = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=F64).repeat_interleave(n // 4)
        data = _spectrum_data(eigs, samples, g)  # samples x n, the batch axis
        return data if axis == "batch" else data.T.contiguous()
    raise ValueError(kind)


def _outcome(whiten: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> tuple[str, float | None]:
    """(one of ``OUTCOMES``, max |gradient| when ok) for one whitening forward + backward with a fixed random
    upstream gradient."""
    z = z.clone().requires_grad_()
    try:
        out = whiten(z)
    except RuntimeError:  # torch.linalg.LinAlgError (eigh did not converge, Cholesky not PD) subclasses it
        return "linalg_error", None
    if not torch.isfinite(out).all():
        return "nonfinite_output", None
    g = torch.Generator().manual_seed(1)
    try:
        (out * torch.randn(out.shape, generator=g)).sum().backward()
    except RuntimeError:
        return "linalg_error", None
    if not torch.isfinite(z.grad).all():
        return "nonfinite_grad", None
    return "ok", float(z.grad.abs().max())


def robustness(configs, trials, log) -> list[Row]:
    rows = []
    for kind, axis, m, d in configs:
        case = f"{axis} m={m} d={d} {kind}"
        inputs = [ill_conditioned(kind, m, d, seed=t, axis=axis) for t in range(trials)]
        for name, whiten in METHODS.items():
            counts = dict.fromkeys(OUTCOMES, 0)
            grads = []
            for z in inputs:
                status, gmax = _outcome(lambda x, whiten=whiten, axis=axis: whiten(x, axis), z)
                counts[status] += 1
                if gmax is not None:
                    grads.append(gmax)
            failures = trials - counts["ok"]
            gmed = sorted(grads)[len(grads) // 2] if grads else None
            log(f"[whitening] robustness {case} {name}: {failures}/{trials} failed {counts}, "
                f"median max|grad| {gmed if gmed is None else f'{gmed:.3g}'}")
            rows.append(Row(ROBUSTNESS, case, name, "failed trials", [float(failures)],
                            extra={"trials": trials, **counts, "median_max_abs_grad": gmed,
                                   "max_max_abs_grad": max(grads) if grads else None}))
    return rows


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, full: bool = False, log=print) -> list[Row]:
    if quick:
        timing_cases = [("channel", 16, 64), ("batch", 16, 32)]
        configs = [("gaussian", "batch", 8, 32), ("repeated", "batch", 32, 8), ("collapsed", "channel", 16, 64)]
        trials = 2
    else:
        timing_cases = [("channel", 256, 8192), ("batch", 256, 512), ("batch", 256, 1024)]
        if full:
            timing_cases.append(("batch", 256, 2048))
        configs = [("gaussian", "batch", 64, 256), ("repeated", "batch", 256, 128), ("repeated", "channel", 128, 4096),
                   ("collapsed", "batch", 256, 512), ("collapsed", "channel", 256, 8192)]
        trials = 10
    return timing(timing_cases, warmup, repeats, log) + robustness(configs, trials, log)


def run_objective(quick: bool = False, warmup: int = 1, repeats: int = 5, log=print) -> list[Row]:
    """The ``objective`` benchmark: the INTL objective of 2 views at the paper's channel shape (m=256, d=8192)."""
    return objective_timing([(16, 64)] if quick else [(256, 8192)], warmup, repeats, log)


# ---------------------------------------------------------------------------------------------- report
def summary_markdown(rows: list[Row]) -> str:
    """The whitening table: per method its time on every timed case (and that time over IterNorm's), then its
    failures and gradient size on every ill-conditioned case."""
    timed = [r for r in rows if r.benchmark == NAME]
    counted = [r for r in rows if r.benchmark == ROBUSTNESS]
    if not timed and not counted:
        return ""
    lines = ["## Whitening: time, failures, gradient size", ""]
    if timed:
        cases = list(dict.fromkeys(r.case for r in timed))
        by = {(r.case, r.variant): r for r in timed}
        lines += ["Median ms (forward + backward of 2 views + norm_mse) and, in brackets, that time over IterNorm's; "
                  "above 1 is slower than IterNorm.", "",
                  "| method | " + " | ".join(cases) + " |", "|---|" + "---:|" * len(cases)]
        for name in TIMED:
            cells = []
            for c in cases:
                r, ours = by.get((c, name)), by.get((c, ITERNORM))
                rel = f" ({r.median / ours.median:.2f})" if r is not None and ours is not None else ""
                cells.append("-" if r is None else f"{r.median:.4g}{rel}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if counted:
        cases = list(dict.fromkeys(r.case for r in counted))
        by = {(r.case, r.variant): r for r in counted}
        lines += ["Failed trials / trials (L = LinAlgError, O = non-finite output, G = non-finite gradient) and the "
                  "median (max) over the ok trials of the largest gradient entry |dL/dz|.", "",
                  "| method | " + " | ".join(cases) + " |", "|---|" + "---:|" * len(cases)]
        for name in METHODS:
            cells = []
            for c in cases:
                r = by.get((c, name))
                if r is None:
                    cells.append("-")
                    continue
                e = r.extra
                kinds = "".join(f" {k}{e[o]}" for k, o in (("L", "linalg_error"), ("O", "nonfinite_output"),
                                                             ("G", "nonfinite_grad")) if e[o])
                g = "-" if e["median_max_abs_grad"] is None else \
                    f"{e['median_max_abs_grad']:.3g} ({e['max_max_abs_grad']:.3g})"
                cells.append(f"{int(r.values[0])}/{e['trials']}{kinds}; {g}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[Row], path: Path) -> Path | None:
    """Three panels: the time of every method on every timed case (log scale), the failed trials per
    ill-conditioned case, and the gradient size over the ok trials (log scale)."""
    timed = [r for r in rows if r.benchmark == NAME]
    counted = [r for r in rows if r.benchmark == ROBUSTNESS]
    if not timed and not counted:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5))
    names = list(TIMED)
    colours = {n: plt.cm.tab10(i) for i, n in enumerate(names)}

    def bars(ax, subset, methods, value):
        cases = list(dict.fromkeys(r.case for r in subset))
        by = {(r.case, r.variant): r for r in subset}
        width = 0.8 / len(methods)
        for i, n in enumerate(methods):
            pts = [(j + i * width, value(by[(c, n)])) for j, c in enumerate(cases) if (c, n) in by]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.bar(*zip(*pts), width, label=n, color=colours[n])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))],
                      [c.replace(" whitening", "").replace(" d=", "\nd=") for c in cases], fontsize=8)

    bars(axes[0], timed, names, lambda r: r.median)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms, forward + backward (2 views + norm_mse), median")
    axes[0].set_title("time")
    axes[0].legend(fontsize=7)
    bars(axes[1], counted, list(METHODS), lambda r: r.values[0] / r.extra["trials"])
    axes[1].set_ylim(0, 1.05)
    axes[1].set_ylabel("failed trials / trials (LinAlgError, non-finite output or gradient)")
    axes[1].set_title("failures on ill-conditioned inputs")
    bars(axes[2], counted, list(METHODS), lambda r: r.extra["median_max_abs_grad"])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("median over ok trials of max |dL/dz|")
    axes[2].set_title("gradient size (missing bar: every trial failed)")
    fig.tight_layout()
    return save_figure(fig, path)
