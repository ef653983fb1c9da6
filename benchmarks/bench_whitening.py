"""Whitening: cost and robustness of IterNorm (+ INTL loss) against ZCA whitening by eigendecomposition.

Timing: the INTL loss of two views (``pretrain.losses.intl_loss``: IterNorm T=4 on each view, norm_mse,
trace loss), forward + backward, against the same alignment loss on ZCA-whitened views
(``benchmarks.baselines.zca_whiten``: ``torch.linalg.eigh`` of the same covariance matrix), at the
paper's shapes: channel whitening m=256, d=8192 (m x m covariance) and batch whitening m=256,
d=512..2048 (d x d covariance).

Robustness (paper Appendix D.3): ill-conditioned inputs where the covariance is singular or nearly so,
d > m for batch whitening, and collapsed (low-rank) embeddings. For each trial (seeded) we count
whether eigh raises, whether the whitened output is non-finite, whether the gradient is non-finite,
for ZCA in float32 (plain, and with the usual eps = 1e-5 added to the eigenvalues), for the repository's
guarded eigendecomposition (``pretrain.losses.power_transform``: float64, clamped eigenvalues) and for
IterNorm; for the trials that stay finite, the median of the largest gradient entry (exploding or not).
"""

from __future__ import annotations

import torch

from benchmarks.baselines import zca_whiten
from benchmarks.common import Row, interleaved
from pretrain.losses import intl_loss, iternorm, norm_mse, power_transform, trace_loss

NAME = "whitening"


def _intl_step(z1, z2, axis):
    def run():
        z1.grad = z2.grad = None
        intl_loss([z1, z2], axis=axis)["loss"].backward()
    return run


def _zca_step(z1, z2, axis):
    def run():
        z1.grad = z2.grad = None
        norm_mse(zca_whiten(z1, axis), zca_whiten(z2, axis)).backward()
    return run


def timing(cases, warmup, repeats, log) -> list[Row]:
    rows = []
    for axis, m, d in cases:
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(m, d, generator=g).requires_grad_()
        z2 = (z1.detach() + 0.5 * torch.randn(m, d, generator=g)).requires_grad_()
        case = f"{axis} whitening m={m} d={d}"
        fns = {"ZCA eigh + norm_mse": _zca_step(z1, z2, axis), "IterNorm T=4 + INTL loss": _intl_step(z1, z2, axis)}
        times = interleaved(fns, warmup, repeats,
                            progress=lambda msg, case=case: log(f"[whitening] {case}: {msg}"))
        base = "ZCA eigh + norm_mse"
        for name, ts in times.items():
            rows.append(Row(NAME, case, name, "ms (fwd+bwd, 2 views)", [1000 * t for t in ts],
                            baseline=None if name == base else base))
    return rows


# ---------------------------------------------------------------------------------------------- robustness
def ill_conditioned(kind: str, m: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":  # full-rank data; singular only because d > m (batch whitening)
        return torch.randn(m, d, generator=g)
    if kind == "collapsed":  # rank-8 embedding + tiny noise: what a collapsing projector produces
        low = torch.randn(m, 8, generator=g) @ torch.randn(8, d, generator=g)
        return low + 1e-4 * torch.randn(m, d, generator=g)
    raise ValueError(kind)


def _outcome(whiten, z: torch.Tensor) -> tuple[str, float | None]:
    """('ok' | 'eigh_error' | 'nonfinite_output' | 'nonfinite_grad', max |gradient| when finite) for one
    whitening forward + backward with a fixed random upstream gradient."""
    z = z.clone().requires_grad_()
    try:
        out = whiten(z)
    except RuntimeError:  # torch.linalg.LinAlgError (eigh did not converge) subclasses RuntimeError
        return "eigh_error", None
    if not torch.isfinite(out).all():
        return "nonfinite_output", None
    g = torch.Generator().manual_seed(1)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    if not torch.isfinite(z.grad).all():
        return "nonfinite_grad", None
    return "ok", float(z.grad.abs().max())


def robustness(configs, trials, log) -> list[Row]:
    methods = {
        "ZCA eigh fp32": lambda axis: (lambda z: zca_whiten(z, axis)),
        "ZCA eigh fp32 eps=1e-5": lambda axis: (lambda z: zca_whiten(z, axis, eps=1e-5)),
        # the repository's guarded eigendecomposition (float64, eigenvalues clamped), for reference
        "eigh fp64 clamped (losses.power_transform)": lambda axis: (lambda z: power_transform(z, 0.5, axis)),
        "IterNorm T=4 (+ trace loss)": lambda axis: (lambda z: _iternorm_with_trace(z, axis)),
    }
    rows = []
    for kind, axis, m, d in configs:
        case = f"{axis} m={m} d={d} {kind}"
        for name, make in methods.items():
            fn = make(axis)
            counts = {"ok": 0, "eigh_error": 0, "nonfinite_output": 0, "nonfinite_grad": 0}
            grads = []
            for t in range(trials):
                status, gmax = _outcome(fn, ill_conditioned(kind, m, d, seed=t))
                counts[status] += 1
                if gmax is not None:
                    grads.append(gmax)
            failures = trials - counts["ok"]
            gmed = sorted(grads)[len(grads) // 2] if grads else None
            log(f"[whitening] robustness {case} {name}: {failures}/{trials} failed {counts}, "
                f"median max|grad| {gmed if gmed is None else f'{gmed:.3g}'}")
            rows.append(Row(NAME + "-robustness", case, name, "failed trials", [float(failures)],
                            extra={"trials": trials, **counts, "median_max_abs_grad": gmed}))
    return rows


def _iternorm_with_trace(z, axis):
    out = iternorm(z, 4, axis)
    # the trace loss is part of what INTL backpropagates; add it with a zero-mean probe so the output
    # values stay IterNorm's
    return out + 0.0 * trace_loss(out, axis)


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, full: bool = False, log=print) -> list[Row]:
    if quick:
        timing_cases = [("channel", 16, 64), ("batch", 16, 32)]
        configs = [("gaussian", "batch", 8, 32), ("collapsed", "channel", 16, 64)]
        trials = 2
    else:
        timing_cases = [("channel", 256, 8192), ("batch", 256, 512), ("batch", 256, 1024)]
        if full:
            timing_cases.append(("batch", 256, 2048))
        configs = [("gaussian", "batch", 64, 128), ("gaussian", "batch", 64, 256), ("gaussian", "batch", 64, 512),
                   ("collapsed", "batch", 256, 512), ("collapsed", "channel", 256, 8192)]
        trials = 20
    return timing(timing_cases, warmup, repeats, log) + robustness(configs, trials, log)
