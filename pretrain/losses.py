"""Pure loss functions of INTL and the methods compared with it.

Every function here works on the GLOBAL batch (the caller, ``pretrain.methods``, all-gathers first) and
has no state. Conventions follow the reference implementation of INTL (github.com/winci-ai/INTL):

- ``z`` is (m, d): m samples, d features.
- Channel whitening (``axis="channel"``, the paper's default): each sample is centred over its d
  features, the covariance is over samples, m x m, divided by d - 1, and the whitening matrix multiplies
  from the left (``P z``).
- Batch whitening (``axis="batch"``): each feature is centred over the batch, the covariance is d x d,
  divided by m - 1, and the whitening matrix multiplies from the right (``z P``).
- IterNorm: ``Sigma_N = Sigma / tr(Sigma)``, ``P_0 = I``, ``P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2``,
  output ``P_T z_c / sqrt(tr(Sigma))``. No eigendecomposition.
- Trace loss: the output's per-"sample" variance along the whitened axis, normalised like the
  covariance (d - 1 for channel, m - 1 for batch), pushed to 1 and summed: ``sum_i (1 - v_i)^2``.
- ``beta = 0.01 * (log2(global batch) - 3)`` for channel whitening, ``0.01 * (log2(d) - 3)`` for batch.

Numerically delicate parts (matrix powers, eigendecompositions, covariances) run in float32 at least,
with autocast disabled, whatever the caller's autocast state (solo-learn's whitening does the same with
a custom fwd). float64 inputs stay float64 (the tests compare against references at 1e-8).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from common.errors import UserError

AXES = ("channel", "batch")


# ----------------------------------------------------------------------------------------------------
# precision helpers
# ----------------------------------------------------------------------------------------------------
def _full_precision(z: torch.Tensor) -> torch.Tensor:
    """float32/float64 stay as they are; half/bfloat16 (autocast outputs) are promoted to float32."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


@contextlib.contextmanager
def no_autocast(device_type: str):
    """A region where autocast is off (for CUDA and CPU autocast alike)."""
    if device_type not in ("cuda", "cpu"):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r} (channel = the paper's default)")


def _check_2d(z: torch.Tensor, name: str = "z") -> None:
    if z.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (samples, features) tensor, got shape {tuple(z.shape)}")


# ----------------------------------------------------------------------------------------------------
# centring and covariance along an axis
# ----------------------------------------------------------------------------------------------------
def centre(z: torch.Tensor, axis: str = "channel") -> torch.Tensor:
    """channel: every sample centred over its features; batch: every feature centred over the batch."""
    _check_axis(axis)
    return z - z.mean(dim=1, keepdim=True) if axis == "channel" else z - z.mean(dim=0, keepdim=True)


def _degrees_of_freedom(zc: torch.Tensor, axis: str) -> int:
    """The covariance's divisor along ``axis``: d - 1 for channel, m - 1 for batch (at least 1)."""
    _check_axis(axis)
    m, d = zc.shape
    if axis == "channel" and d < 2:
        raise ValueError(f"channel whitening needs at least 2 features, got d={d}")
    if axis == "batch" and m < 2:
        raise ValueError(f"batch whitening needs at least 2 samples, got m={m}")
    return d - 1 if axis == "channel" else m - 1


def axis_covariance(zc: torch.Tensor, axis: str = "channel") -> torch.Tensor:
    """Covariance of already centred ``zc``: m x m / (d - 1) for channel, d x d / (m - 1) for batch."""
    dof = _degrees_of_freedom(zc, axis)
    return zc @ zc.T / dof if axis == "channel" else zc.T @ zc / dof


def _apply(matrix: torch.Tensor, zc: torch.Tensor, axis: str) -> torch.Tensor:
    """Applies a symmetric whitening matrix along ``axis`` (left for channel, right for batch)."""
    return matrix @ zc if axis == "channel" else zc @ matrix


# ----------------------------------------------------------------------------------------------------
# IterNorm
# ----------------------------------------------------------------------------------------------------
def newton_polynomial(x: torch.Tensor, iters: int) -> torch.Tensor:
    """f_T(x) of Theorem 1: f_0 = 1, f_k = (3 f_{k-1} - x f_{k-1}^3) / 2, elementwise.

    IterNorm's P_T has the eigenvectors of Sigma and the eigenvalues f_T(lambda / tr Sigma); its output
    covariance has the eigenvalues x f_T(x)^2.
    """
    f = torch.ones_like(x)
    for _ in range(iters):
        f = 1.5 * f - 0.5 * x * f.pow(3)
    return f


def iternorm_matrix(sigma: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """P_T / sqrt(tr(Sigma)) by the paper's (uncoupled) Newton iterations on Sigma / tr(Sigma), three matrix
    products per iteration; the reference ``iternorm_reference`` is built on it."""
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    trace = torch.diagonal(sigma).sum()
    sigma_n = sigma / trace
    p = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * (p @ p @ p @ sigma_n)
    return p / trace.sqrt()


def iternorm_reference(z: torch.Tensor, iters: int = 4, axis: str = "channel") -> torch.Tensor:
    """IterNorm exactly as the paper's code computes it (covariance along ``axis``, ``iters`` uncoupled Newton
    iterations by plain autograd). The reference ``iternorm`` equals (tests) and is benchmarked against;
    not used for training.

    The uncoupled iteration is used far from convergence (T = 4-7): run to convergence on a covariance with
    condition number above ~2.4 it is unstable (the round-off part of P that does not commute with Sigma
    grows each step).
    """
    _check_2d(z)
    _check_axis(axis)
    with no_autocast(z.device.type):
        zc = centre(_full_precision(z), axis)
        matrix = iternorm_matrix(axis_covariance(zc, axis), iters)
        return _apply(matrix, zc, axis)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.T)


def _newton_forward(s: torch.Tensor, iters: int) -> tuple[torch.Tensor, list]:
    """P_T = f_T(S) for a symmetric S (trace 1), in the product form of the same polynomial.

    With Y_k = P_k^2 S and T_k = (3 I - Y_k) / 2 the paper's step P_{k+1} = (3 P_k - P_k^3 S) / 2 is
    P_{k+1} = P_k T_k, and Y_{k+1} = Y_k T_k^2 (every matrix here is a polynomial in S, so they commute).
    P_1 = (3 I - S) / 2 needs no product, Y_1 = S P_1^2 two, each later step three (T_k^2, Y_k T_k^2,
    P_k T_k), the last one only P_k T_k: 3 T - 3 products instead of the paper's 3 T. Returns P_T and
    what the backward needs.
    """
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    if iters == 0:
        return eye, []
    p = 1.5 * eye - 0.5 * s                  # P_1
    q = y = t = None
    steps = []                               # (P_k, T_k, Y_{k-1}, R_{k-1} = T_{k-1}^2) for k = 1 .. T-1
    for k in range(1, iters):
        if k == 1:
            q = p @ p
            y_prev, r, y = None, None, s @ q    # Y_1 = S P_1^2
        else:
            y_prev, r = y, t @ t
            y = y_prev @ r                       # Y_k = Y_{k-1} T_{k-1}^2
        t = 1.5 * eye - 0.5 * y
        steps.append((p, t, y_prev, r))
        p = p @ t                                # P_{k+1} = P_k T_k
    return p, [q, steps]


def _newton_backward(s: torch.Tensor, saved: list, h: torch.Tensor, iters: int) -> torch.Tensor:
    """dL/dS for a symmetric cotangent ``h`` = dL/dP_T of ``_newton_forward`` (symmetric part only: every
    tangent of a matrix polynomial of S is symmetric, so each adjoint is symmetrised, 1 product for
    each product of the forward except T_k^2, whose adjoint is 2 sym(H T_k): 5 (T - 1) products)."""
    if iters == 0:
        return torch.zeros_like(s)
    q, steps = saved
    h_p, h_t_carry, h_y_carry, h_s = h, None, None, None
    for k in range(iters - 1, 0, -1):
        p_k, t_k, y_prev, r = steps[k - 1]
        h_t = _sym(p_k @ h_p)                                  # P_{k+1} = P_k T_k
        if h_t_carry is not None:
            h_t = h_t + h_t_carry
        h_p = _sym(h_p @ t_k)
        h_y = -0.5 * h_t                                       # T_k = (3 I - Y_k) / 2
        if h_y_carry is not None:
            h_y = h_y + h_y_carry
        if k >= 2:                                             # Y_k = Y_{k-1} R_{k-1}, R_{k-1} = T_{k-1}^2
            h_r = _sym(y_prev @ h_y)
            h_y_carry = _sym(h_y @ r)
            h_t_carry = 2.0 * _sym(h_r @ steps[k - 2][1])
        else:                                                  # Y_1 = S Q, Q = P_1^2
            h_s = _sym(h_y @ q)
            h_p = h_p + 2.0 * _sym(_sym(s @ h_y) @ p_k)
    out = -0.5 * h_p  # P_1 = (3 I - S) / 2
    return out if h_s is None else out + h_s


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x x^T from its upper block triangle: for n >= 128 rows, 3 products of half the rows (3/4 of one full
    product's work; measured 23% faster at 256 x 8192 on CPU), the lower-left block mirrored."""
    n = x.shape[0]
    if n < 128:
        return x @ x.T
    h = n // 2
    top, bottom = x[:h], x[h:]
    out = x.new_empty(n, n)
    out[:h, :h] = top @ top.T
    out[:h, h:] = top @ bottom.T
    out[h:, :h] = out[:h, h:].T
    out[h:, h:] = bottom @ bottom.T
    return out


class _IterNormFunction(torch.autograd.Function):
    """IterNorm of ``z`` (m, d), centring included, with its forward and backward written out (see ``iternorm``)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, iters: int, axis: str, dof: int):  # noqa: D401 - autograd API
        centre_dim = 1 if axis == "channel" else 0
        zc = z - z.mean(dim=centre_dim, keepdim=True)
        left = zc.shape[0] <= zc.shape[1]  # the smaller Gram matrix: m x m (A zc) or d x d (zc A)
        gram = _gram(zc if left else zc.T)
        trace = torch.diagonal(gram).sum()
        s = gram / trace
        p, saved = _newton_forward(s, iters)
        scale = (dof / trace).sqrt()
        a = p * scale
        ctx.left, ctx.iters, ctx.centre_dim, ctx.saved = left, iters, centre_dim, saved
        ctx.save_for_backward(zc, s, a, trace, scale)
        return a @ zc if left else zc @ a

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        zc, s, a, trace, scale = ctx.saved_tensors
        left = ctx.left
        with no_autocast(grad.device.type):
            grad = grad.to(zc.dtype)
            h_a = _sym(grad @ zc.T if left else zc.T @ grad)     # dL/dA, symmetric part (A is symmetric)
            d_scale = (h_a * a).sum() / scale                     # dL/dscale = <dL/dA, P>
            h_s = _newton_backward(s, ctx.saved, h_a * scale, ctx.iters)
            d_trace = -(h_s * s).sum() / trace - 0.5 * d_scale * scale / trace
            w = h_s * (2.0 / trace)                               # 2 dL/dGram (symmetric)
            w.diagonal().add_(2.0 * d_trace)                      # trace(Gram) = |zc|^2
            if left:
                d_z = (w @ zc).addmm_(a.T, grad)                  # dL/dzc = A^T G + 2 dL/dGram zc
            else:
                d_z = (zc @ w).addmm_(grad, a.T)
            d_z -= d_z.mean(dim=ctx.centre_dim, keepdim=True)     # through the centring
        return d_z, None, None, None


def iternorm(z: torch.Tensor, iters: int = 4, axis: str = "channel") -> torch.Tensor:
    """IterNorm whitening of z (m, d) along ``axis`` with ``iters`` Newton iterations (T).

    Returns the whitened, centred output with the shape of ``z``; dtype float64 for float64 input,
    float32 otherwise (half/bfloat16 inputs from autocast are computed in float32).

    The paper's output computed for less (``iternorm_reference`` is the paper's computation; the two agree to
    round-off, outputs and gradients, tests/pretrain/test_losses.py):
    - the smaller Gram matrix: P_T is a polynomial in the covariance, and f(Z^T Z) Z^T = Z^T f(Z Z^T), so the
      Newton iterations run on the m x m or the d x d Gram matrix, whichever is smaller, with the same trace
      (batch whitening m=256, d=2048 iterates on 256 x 256 instead of 2048 x 2048);
    - 3 T - 3 matrix products for P_T instead of 3 T (``_newton_forward``);
    - a backward written out (``_IterNormFunction.backward``): one product with z for the covariance's
      gradient instead of autograd's two, and 5 (T - 1) small products for the iterations instead of 6 T.
    The product form is also stable run to convergence, where the paper's uncoupled iteration is not
    (``iternorm_reference``); at the T of practice (4-7) they agree.
    """
    _check_2d(z)
    _check_axis(axis)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    with no_autocast(z.device.type):
        z = _full_precision(z)
        return _IterNormFunction.apply(z, int(iters), axis, _degrees_of_freedom(z, axis))


class _NewtonFunction(torch.autograd.Function):
    """P_T = f_T(S) of a symmetric S (trace 1) with the written-out backward of ``_newton_backward``."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, iters: int):  # noqa: D401 - autograd API
        p, saved = _newton_forward(s, iters)
        ctx.iters, ctx.saved = iters, saved
        ctx.save_for_backward(s)
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (s,) = ctx.saved_tensors
        return _newton_backward(s, ctx.saved, _sym(grad.to(s.dtype)), ctx.iters), None


class _GramSetFunction(torch.autograd.Function):
    """The Gram matrices ``x_i x_j^T`` of a few (m, d) matrices for the index ``pairs``; the backward does one
    product with each x_j that a gradient reaches: dL/dx_i = sum_j C_ij x_j."""

    @staticmethod
    def forward(ctx, pairs: tuple, *xs: torch.Tensor):  # noqa: D401 - autograd API
        ctx.pairs = pairs
        ctx.save_for_backward(*xs)
        return tuple(_gram(xs[i]) if i == j else xs[i] @ xs[j].T for i, j in pairs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        xs = ctx.saved_tensors
        wanted = ctx.needs_input_grad[1:]
        coeff: dict[tuple[int, int], torch.Tensor] = {}   # (i, j) -> C_ij

        def add(i: int, j: int, c: torch.Tensor) -> None:
            if wanted[i]:
                coeff[i, j] = coeff[i, j] + c if (i, j) in coeff else c

        for (i, j), g in zip(ctx.pairs, grads):
            g = g.to(xs[i].dtype)
            if i == j:
                add(i, i, g + g.T)
            else:
                add(i, j, g)
                add(j, i, g.T)
        out: list[torch.Tensor | None] = [None] * len(xs)
        for (i, j), c in coeff.items():
            out[i] = c @ xs[j] if out[i] is None else out[i].addmm_(c, xs[j])
        return (None, *out)


def _rowwise_dot(a: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The diagonal of a g b^T (m x m matrices) without the full product: one small product."""
    return ((a @ g) * b).sum(dim=1)


# ----------------------------------------------------------------------------------------------------
# Spectral transformation lambda^-p by eigendecomposition (ST family; p = 0.5 is hard whitening)
# ----------------------------------------------------------------------------------------------------
class EighFailure(UserError, RuntimeError):
    """The eigendecomposition of the embedding covariance failed; the message says why and what to do."""


def _describe_matrix(sigma: torch.Tensor) -> str:
    diag = torch.diagonal(sigma)
    finite = bool(torch.isfinite(sigma).all())
    return (f"covariance {tuple(sigma.shape)} {sigma.dtype}: finite={finite}, trace={float(diag.sum()):.4g}, "
            f"diag min={float(diag.min()):.4g} max={float(diag.max()):.4g}")


def power_matrix(sigma: torch.Tensor, power: float, eps: float = 1e-6) -> torch.Tensor:
    """U diag(lambda^-power) U^T of a symmetric PSD ``sigma``, computed in float64.

    Guards: non-finite input raises ``EighFailure``; eigenvalues are clamped below at
    ``eps * max(lambda_max, tiny)`` so that a rank-deficient covariance (collapse, or m < d) gives
    large but finite gains; a failed eigh (no convergence) raises ``EighFailure`` with a report.
    """
    if not torch.isfinite(sigma).all():
        raise EighFailure(f"non-finite embedding covariance ({_describe_matrix(sigma)}); the projector "
                          "output is NaN/inf: lower the learning rate or check the data, then resume")
    s64 = sigma.double()
    s64 = 0.5 * (s64 + s64.T)
    try:
        eigvals, eigvecs = torch.linalg.eigh(s64)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise EighFailure(f"eigendecomposition failed ({err}); {_describe_matrix(sigma)}. Use a larger "
                          "st_power eps, fewer/larger features, or IterNorm (method=intl), which needs no "
                          "eigendecomposition") from err
    floor = eps * eigvals.detach().max().clamp(min=torch.finfo(torch.float64).tiny)
    gains = eigvals.clamp(min=floor).pow(-power)
    return ((eigvecs * gains) @ eigvecs.T).to(sigma.dtype)


def power_transform(z: torch.Tensor, power: float = 0.5, axis: str = "channel", eps: float = 1e-6) -> torch.Tensor:
    """Spectral transformation Phi(Sigma) = Sigma^-power applied to the centred z along ``axis``.

    power = 0.5 is hard (ZCA) whitening as in W-MSE; power = 0 only centres. Output covariance has the
    eigenvalues lambda^(1 - 2 power).
    """
    _check_2d(z)
    _check_axis(axis)
    with no_autocast(z.device.type):
        zc = centre(_full_precision(z), axis)
        return _apply(power_matrix(axis_covariance(zc, axis), power, eps), zc, axis)


# ----------------------------------------------------------------------------------------------------
# INTL pieces
# ----------------------------------------------------------------------------------------------------
def trace_loss(z_hat: torch.Tensor, axis: str = "channel") -> torch.Tensor:
    """sum_i (1 - v_i)^2 where v_i is the variance of the (re-centred) output along the whitened axis.

    channel: v_i = |z_hat_i - mean_features(z_hat_i)|^2 / (d - 1) for each of the m samples.
    batch:   v_j = |z_hat[:, j] - mean_batch|^2 / (m - 1) for each of the d features.
    """
    _check_2d(z_hat, "z_hat")
    with no_autocast(z_hat.device.type):
        zc = centre(_full_precision(z_hat), axis)
        m, d = zc.shape
        var = zc.pow(2).sum(dim=1) / (d - 1) if axis == "channel" else zc.pow(2).sum(dim=0) / (m - 1)
        return (var - 1.0).pow(2).sum()


def norm_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 - 2 * mean cosine similarity of the rows of a and b (MSE of L2-normalised vectors)."""
    with no_autocast(a.device.type):
        a = F.normalize(_full_precision(a), dim=-1)
        b = F.normalize(_full_precision(b), dim=-1)
        return 2.0 - 2.0 * (a * b).sum(dim=-1).mean()


def intl_beta(batch_size: int, dim: int, axis: str = "channel") -> float:
    """Trace-loss weight: 0.01 (log2(global batch) - 3) for channel, 0.01 (log2(d) - 3) for batch whitening."""
    _check_axis(axis)
    n = batch_size if axis == "channel" else dim
    if n < 1:
        raise ValueError(f"{'batch size' if axis == 'channel' else 'dim'} must be positive, got {n}")
    return 0.01 * (math.log2(n) - 3)


# ----------------------------------------------------------------------------------------------------
# The multi-view combination shared by every objective
# ----------------------------------------------------------------------------------------------------
PairFn = Callable[[Any, Any], dict]
ViewFn = Callable[[Any], dict]


def combine_views(views: Sequence[Any], target: Any | None, pair_fn: PairFn,
                  view_fn: ViewFn | None = None) -> dict:
    """INTL's multi-view rule for any objective made of a pair term and a per-view term.

    Used by intl and its ablations, st_power, Barlow Twins and VICReg (why: ``configs/method/README.md``);
    FroSSL combines its views by its authors' rule instead (``frossl_loss``).

    Without ``target``: crop 0 is ``views[0]``; loss = mean over i >= 1 of
    ``pair(views[i], views[0]) + view(views[i]) + view(views[0])`` (INTL's multi-crop: every crop against
    crop 0, averaged; 2 views is the plain symmetric loss).
    With ``target`` (EMA variant): ``views`` are the online crops 1..n-1 and ``target`` is the momentum
    encoder's crop 0; loss = mean over i of ``pair(views[i], target) + view(views[i])`` (regulariser on
    the online crops only).

    ``pair_fn`` / ``view_fn`` return dicts of scalar tensors that are summed into ``loss``; every part is
    also reported (averaged the same way, detached) under its own key.
    """
    views = list(views)
    if target is None:
        if len(views) < 2:
            raise ValueError(f"need at least 2 views without an EMA target, got {len(views)}")
        anchor, others = views[0], views[1:]
    else:
        if len(views) < 1:
            raise ValueError("need at least 1 online view with an EMA target")
        anchor, others = target, views
    anchor_terms = view_fn(anchor) if (view_fn is not None and target is None) else {}
    parts: dict[str, torch.Tensor] = {}
    total = None
    for v in others:
        terms = dict(pair_fn(v, anchor))
        if view_fn is not None:
            for k, val in view_fn(v).items():
                terms[k] = terms[k] + val if k in terms else val
        for k, val in anchor_terms.items():
            terms[k] = terms[k] + val if k in terms else val
        pair_total = sum(terms.values())
        total = pair_total if total is None else total + pair_total
        for k, val in terms.items():
            parts[k] = parts[k] + val.detach() if k in parts else val.detach()
    n = len(others)
    out = {"loss": total / n}
    out.update({k: v / n for k, v in parts.items()})
    return out


# ----------------------------------------------------------------------------------------------------
# INTL and its ablations
# ----------------------------------------------------------------------------------------------------
def intl_loss(views: Sequence[torch.Tensor], target: torch.Tensor | None = None, *, iters: int = 4,
              axis: str = "channel", beta: float | None = None, whiten: bool = True,
              fused: bool = False) -> dict:
    """INTL objective on global-batch projector outputs.

    Each view is whitened with IterNorm (``whiten=False``: only centred, the trace-only ablation), then
    loss = mean over pairs of ``norm_mse + beta * trace terms`` (``combine_views``). ``beta=None`` uses
    ``intl_beta`` of this batch; ``beta=0`` is the IterNorm-only ablation.
    Returns {"loss", "align", "trace" (beta-weighted), "beta"}.

    By default every view is whitened with ``iternorm`` and the losses read the outputs (the definition).
    ``fused=True`` (channel whitening with m <= d only; ``method.fused=true``) computes the same loss from m x m
    Gram matrices without forming the whitened outputs (``_intl_channel_from_grams``, 1.88x faster at m=256,
    d=8192). The two agree to round-off, loss and gradients (tests/pretrain/test_losses.py); not the default
    because round-off sends a training run on another trajectory, and three-seed runs of the short pretraining
    test did not settle that the two learn alike (README "Performance").
    """
    ref = target if target is not None else views[0]
    if beta is None:
        beta = intl_beta(ref.shape[0], ref.shape[1], axis)
    if fused:
        if not (whiten and axis == "channel" and ref.shape[0] <= ref.shape[1]):
            raise ValueError("fused=True needs channel whitening (axis='channel', whiten=True) with at most as many "
                             f"samples as features, got axis={axis!r} whiten={whiten} shape {tuple(ref.shape)}; "
                             "fix: set method.fused=false")
        out = _intl_channel_from_grams(list(views), target, iters, float(beta))
    else:
        out = _intl_from_outputs(list(views), target, iters, axis, float(beta), whiten)
    out.setdefault("trace", torch.zeros((), dtype=out["loss"].dtype, device=out["loss"].device))
    out["beta"] = float(beta)
    return out


def _intl_from_outputs(views: list[torch.Tensor], target: torch.Tensor | None, iters: int, axis: str,
                       beta: float, whiten: bool) -> dict:
    """INTL by its definition: the whitened outputs, then ``norm_mse`` and ``trace_loss`` on them."""
    def transform(z: torch.Tensor) -> torch.Tensor:
        return iternorm(z, iters, axis) if whiten else centre(_full_precision(z), axis)

    t_views = [transform(v) for v in views]
    t_target = None if target is None else transform(target)

    def pair(a, b):
        return {"align": norm_mse(a, b)}

    def view(z):
        return {"trace": beta * trace_loss(z, axis)} if beta != 0 else {}

    return combine_views(t_views, t_target, pair, view)


def _intl_channel_from_grams(views: list[torch.Tensor], target: torch.Tensor | None, iters: int,
                             beta: float) -> dict:
    """INTL with channel whitening computed from Gram matrices, the whitened outputs never formed.

    With z_c the centred (m, d) view and A = P_T sqrt((d - 1) / tr) the whitening matrix (m x m, a function of
    G = z_c z_c^T), the output is Y = A z_c, and everything the objective reads of it is a diagonal of a small
    matrix: |y_r|^2 = (A G A^T)_rr (the trace loss; the rows of Y stay centred) and y_r . y'_r = (A G' A'^T)_rr
    with the cross-Gram G' = z_c z'_c^T (the cosine of ``norm_mse``). So the big (m x d) products are the Gram
    matrices (each view's, and one cross-Gram per pair) and, in the backward, one product of each view with
    each Gram it entered: for 2 views at m=256, d=8192, 6.5 products of the embedding's size instead of 12
    for the paper's computation. The small matrices run through the same Newton polynomial as ``iternorm``.
    """
    with no_autocast((target if target is not None else views[0]).device.type):
        crops = ([target] if target is not None else []) + views  # crop 0 is the anchor
        for c in crops:
            _check_2d(c)
        zc = [centre(_full_precision(c), "channel") for c in crops]
        dof = _degrees_of_freedom(zc[0], "channel")
        pairs = tuple((i, i) for i in range(len(zc))) + tuple((i, 0) for i in range(1, len(zc)))
        grams = dict(zip(pairs, _GramSetFunction.apply(pairs, *zc)))
        whitening = []
        for i in range(len(zc)):
            gram = grams[i, i]
            trace = torch.diagonal(gram).sum()
            whitening.append(_NewtonFunction.apply(gram / trace, iters) * (dof / trace).sqrt())
        squares = [_rowwise_dot(a, grams[i, i], a) for i, a in enumerate(whitening)]   # |y_r|^2
        norms = [sq.clamp(min=0).sqrt() for sq in squares]

        def pair(i: int, j: int) -> dict:
            dot = _rowwise_dot(whitening[i], grams[i, j], whitening[j])
            cos = dot / (norms[i].clamp(min=1e-12) * norms[j].clamp(min=1e-12))  # as F.normalize's eps
            return {"align": 2.0 - 2.0 * cos.mean()}

        def view(i: int) -> dict:
            return {"trace": beta * (squares[i] / dof - 1.0).pow(2).sum()} if beta != 0 else {}

        indices = list(range(len(zc)))
        if target is None:
            return combine_views(indices, None, pair, view)
        return combine_views(indices[1:], 0, pair, view)


def st_power_loss(views: Sequence[torch.Tensor], target: torch.Tensor | None = None, *, power: float = 0.5,
                  axis: str = "channel", eps: float = 1e-6) -> dict:
    """Spectral transformation lambda^-power of each view, then norm_mse (power = 0.5: W-MSE-style)."""
    t_views = [power_transform(v, power, axis, eps) for v in views]
    t_target = None if target is None else power_transform(target, power, axis, eps)
    return combine_views(t_views, t_target, lambda a, b: {"align": norm_mse(a, b)})


# ----------------------------------------------------------------------------------------------------
# FroSSL (Skean et al., 2023; github.com/OFSkean/FroSSL, solo/losses/frossl.py)
# ----------------------------------------------------------------------------------------------------
def variance_normalise(z: torch.Tensor) -> torch.Tensor:
    """Each feature centred over the batch and scaled to unit (unbiased) variance, then every column
    rescaled to norm sqrt(d), as FroSSL's two-view loss (the authors' ``frossl_loss_func``) does."""
    with no_autocast(z.device.type):
        z = _full_precision(z)
        zc = z - z.mean(dim=0, keepdim=True)
        zs = zc / zc.std(dim=0, keepdim=True).clamp(min=1e-12)
        return math.sqrt(z.shape[1]) * zs / zs.norm(dim=0, keepdim=True).clamp(min=1e-12)


def column_normalise(z: torch.Tensor) -> torch.Tensor:
    """Every feature column scaled to unit L2 norm over the batch, NOT centred, as FroSSL's multi-view loss
    (the authors' ``multiview_frossl_loss_func``: ``F.normalize(z, dim=0)``) does."""
    with no_autocast(z.device.type):
        return F.normalize(_full_precision(z), p=2, dim=0)


def log_frobenius_sq(z: torch.Tensor) -> torch.Tensor:
    """log ||K / tr(K)||_F^2 of the linear kernel K = Z^T Z (the m x m Gram Z Z^T when m < d: same norm and
    trace), FroSSL's regulariser before its sign (the loss minimises it).

    The authors divide by ``torch.trace(K).item()`` (a detached trace, against float16 casting); after
    either normalisation the trace is a constant (d for unit columns, d^2 for sqrt(d) columns), so its
    gradient is zero and detaching it changes nothing. Kept attached here: scale-invariant for any z.
    """
    with no_autocast(z.device.type):
        z = _full_precision(z)
        m, d = z.shape
        gram = (z.T @ z) if m >= d else (z @ z.T)
        return 2.0 * torch.log(torch.linalg.matrix_norm(gram, ord="fro") / torch.diagonal(gram).sum())


def frossl_two_view(a: torch.Tensor, b: torch.Tensor, regularise_a: bool = True) -> dict:
    """The authors' two-view FroSSL (``frossl_loss_func``, the paper's form): ``variance_normalise`` both
    views (features centred), loss = MSE(a, b) + log ||K_a/tr||_F^2 + log ||K_b/tr||_F^2, every weight 1.

    ``regularise_a=False`` leaves a's regulariser out (EMA: a is the momentum encoder's crop 0, a constant).
    Returns {"loss", "align", "frobenius"}.
    """
    na, nb = variance_normalise(a), variance_normalise(b)
    align = F.mse_loss(na, nb)
    frob = log_frobenius_sq(nb) + (log_frobenius_sq(na) if regularise_a else 0.0)
    return {"loss": align + frob, "align": align.detach(), "frobenius": frob.detach()}


def frossl_multiview(crops: Sequence[torch.Tensor], regularise_first: bool = True) -> dict:
    """The authors' multi-view FroSSL (``multiview_frossl_loss_func``) over V crops.

    Every view ``column_normalise``d (not centred: unlike the two-view form); with zbar the mean of the V
    normalised views, loss = sum over views v of [V * D * MSE(z_v, zbar) + log ||K_v / tr(K_v)||_F^2]: every
    view's regulariser has weight 1, and the invariance part equals sum over the V(V-1)/2 pairs of
    ||z_i - z_j||_F^2 / m (= D * MSE(z_i, z_j)). At V = 2 this is ``frossl_two_view`` of centred inputs: the
    two forms differ only by the centring (the std division and the sqrt(D) scale cancel).

    ``regularise_first=False`` leaves crop 0's regulariser out (EMA: the momentum encoder's crop, no
    gradient); crop 0 still enters every invariance pair. Returns {"loss", "align", "frobenius"}.
    """
    z = [column_normalise(c) for c in crops]
    if len(z) < 2:
        raise ValueError(f"FroSSL needs at least 2 views, got {len(z)}")
    n_views, dim = len(z), z[0].shape[1]
    zbar = torch.stack(z).mean(dim=0)
    align = sum(n_views * dim * F.mse_loss(v, zbar) for v in z)
    frob = sum(log_frobenius_sq(v) for k, v in enumerate(z) if k > 0 or regularise_first)
    return {"loss": align + frob, "align": align.detach(), "frobenius": frob.detach()}


def frossl_loss(views: Sequence[torch.Tensor], target: torch.Tensor | None = None) -> dict:
    """FroSSL as its authors combine views (NOT the INTL rule of ``combine_views``).

    The crops are ``views`` (crop 0 first), or with ``target`` (EMA) the momentum encoder's crop 0 followed
    by the online ``views``. 2 crops: ``frossl_two_view`` (centred features); more than 2:
    ``frossl_multiview`` (uncentred), as the authors' training step did (solo/methods/frossl.py:
    ``frossl_loss_func`` for 2 views, ``multiview_frossl_loss_func`` otherwise). With ``target`` its
    regulariser is left out (it has no gradient), it still takes part in every invariance pair.
    """
    crops = ([target] if target is not None else []) + list(views)
    if len(crops) < 2:
        raise ValueError(f"FroSSL needs at least 2 crops, got {len(crops)}")
    if len(crops) == 2:
        return frossl_two_view(crops[0], crops[1], regularise_a=target is None)
    return frossl_multiview(crops, regularise_first=target is None)


# ----------------------------------------------------------------------------------------------------
# Barlow Twins and VICReg (published default weights), optionally with the trace loss (Table 13)
# ----------------------------------------------------------------------------------------------------
def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_pair(a: torch.Tensor, b: torch.Tensor, lambd: float = 0.0051) -> dict:
    """Barlow Twins: cross-correlation of batch-standardised views (BN without affine, biased variance,
    as nn.BatchNorm1d(affine=False) in training), on-diagonal to 1, off-diagonal to 0 weighted by lambd."""
    with no_autocast(a.device.type):
        a, b = _full_precision(a), _full_precision(b)
        m = a.shape[0]
        an = F.batch_norm(a, None, None, training=True, eps=1e-5)
        bn = F.batch_norm(b, None, None, training=True, eps=1e-5)
        c = an.T @ bn / m
        on = (torch.diagonal(c) - 1).pow(2).sum()
        off = _off_diagonal(c).pow(2).sum()
        return {"on_diag": on, "off_diag": lambd * off}


def vicreg_pair(a: torch.Tensor, b: torch.Tensor, sim_coeff: float = 25.0) -> dict:
    """VICReg invariance term (MSE between the two embeddings, weighted)."""
    with no_autocast(a.device.type):
        return {"invariance": sim_coeff * F.mse_loss(_full_precision(a), _full_precision(b))}


def vicreg_view(z: torch.Tensor, std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4) -> dict:
    """VICReg variance (hinge on std at 1, halved per view as in the paper's code) and covariance terms."""
    with no_autocast(z.device.type):
        z = _full_precision(z)
        m, d = z.shape
        zc = z - z.mean(dim=0, keepdim=True)
        std = torch.sqrt(zc.var(dim=0) + eps)
        cov = zc.T @ zc / (m - 1)
        return {"variance": std_coeff * F.relu(1 - std).mean() / 2,
                "covariance": cov_coeff * _off_diagonal(cov).pow(2).sum() / d}


def _with_trace(view_fn: ViewFn | None, beta: float, axis: str) -> ViewFn | None:
    if not beta:
        return view_fn

    def fn(z):
        terms = dict(view_fn(z)) if view_fn is not None else {}
        terms["trace"] = beta * trace_loss(z, axis)
        return terms

    return fn


def barlow_twins_loss(views: Sequence[torch.Tensor], target: torch.Tensor | None = None, *,
                      lambd: float = 0.0051, trace_beta: float = 0.0, trace_axis: str = "channel") -> dict:
    """Barlow Twins (2 views: the authors' loss) over INTL's multi-view rule for more;
    ``trace_beta > 0`` adds beta * trace loss of each (centred) embedding."""
    return combine_views(views, target, lambda a, b: barlow_twins_pair(a, b, lambd),
                         _with_trace(None, trace_beta, trace_axis))


def vicreg_loss(views: Sequence[torch.Tensor], target: torch.Tensor | None = None, *, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0, trace_beta: float = 0.0,
                trace_axis: str = "channel") -> dict:
    """VICReg (25/25/1; 2 views: the authors' loss) over INTL's multi-view rule for more;
    ``trace_beta > 0`` adds the trace loss."""
    return combine_views(views, target, lambda a, b: vicreg_pair(a, b, sim_coeff),
                         _with_trace(lambda z: vicreg_view(z, std_coeff, cov_coeff), trace_beta, trace_axis))
