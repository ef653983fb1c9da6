"""Pure loss functions: conventions of the reference INTL code, Theorem 1 / Proposition 2, other methods,
and a loss-falls-over-a-few-steps test for every objective (solo-learn style)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain import losses
from pretrain.losses import intl_beta, iternorm, newton_polynomial, norm_mse, trace_loss

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP contention on the loaded 2-core box
    (measured: 2 threads made a 30-step loss test 13x slower while other suites ran)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------
# An independent statement of the reference conventions (github.com/winci-ai/INTL, methods/whitening.py,
# methods/intl.py, methods/base.py), written in their batched "group" form with baddbmm / matrix_power.
# ------------------------------------------------------------------------------------------------------
def ref_iternorm(x: torch.Tensor, axis: int, iters: int) -> torch.Tensor:
    """axis 0 = channel whitening, 1 = batch whitening (the reference's numbering)."""
    d = x.size(-1)
    mean = x.mean(0).view(1, -1) if axis == 1 else x.mean(1).view(-1, 1)
    xn = x - mean
    if axis == 1:
        size = d
        g = xn.reshape(-1, 1, d).permute(1, 0, 2)           # (1, m, d)
    else:
        size = x.size(0)
        g = xn.reshape(-1, 1, d).permute(1, 2, 0)           # (1, d, m)
    eye = torch.eye(size, dtype=x.dtype).unsqueeze(0)
    cov = torch.bmm(g.permute(0, 2, 1), g) / (g.shape[1] - 1)
    tr = cov.diagonal(dim1=-1, dim2=-2).sum(-1).reshape(1, 1, 1)
    sn = cov / tr
    p = eye
    for _ in range(iters):
        p = torch.baddbmm(p, torch.matrix_power(p, 3), sn, beta=1.5, alpha=-0.5)
    out = torch.bmm(g, p / tr.sqrt())
    return out.permute(1, 0, 2).reshape(-1, d) if axis == 1 else out.permute(2, 0, 1).reshape(-1, d)


def ref_trace_loss(x: torch.Tensor, axis: int) -> torch.Tensor:
    if axis == 0:
        x = x.T
    n = x.size(0)
    x = x - x.mean(dim=0)
    return ((x.pow(2).sum(0) / (n - 1)) - 1).pow(2).sum()


def ref_norm_mse(a, b):
    return 2 - 2 * (F.normalize(a) * F.normalize(b)).sum(-1).mean()


def ref_intl(crops, axis, iters, bs, emb):
    """The reference INTL objective: every crop against crop 0, trace loss of both, averaged."""
    trade = (math.log2(bs) - 3) * 0.01 if axis == 0 else (math.log2(emb) - 3) * 0.01
    t = [ref_iternorm(c, axis, iters) for c in crops]
    tl = [ref_trace_loss(c, axis) for c in t]
    loss = sum(ref_norm_mse(t[i], t[0]) + trade * (tl[i] + tl[0]) for i in range(1, len(t)))
    return loss / (len(t) - 1)


def ref_intl_ema(online, target, axis, iters, bs, emb):
    trade = (math.log2(bs) - 3) * 0.01 if axis == 0 else (math.log2(emb) - 3) * 0.01
    tq = [ref_iternorm(c, axis, iters) for c in online]
    tk = ref_iternorm(target, axis, iters)
    return sum(ref_norm_mse(q, tk) + trade * ref_trace_loss(q, axis) for q in tq) / len(tq)


AXES = [("channel", 0), ("batch", 1)]


def _z(m, d, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=g, dtype=dtype) * torch.linspace(0.2, 3, d, dtype=dtype) + 1.5)


@pytest.mark.parametrize("axis,ref_axis", AXES)
@pytest.mark.parametrize("m,d", [(16, 40), (48, 12)])
def test_iternorm_and_trace_loss_match_reference_conventions(axis, ref_axis, m, d):
    z = _z(m, d)
    ours = iternorm(z, 4, axis)
    torch.testing.assert_close(ours, ref_iternorm(z, ref_axis, 4), rtol=0, atol=1e-8)
    assert abs(trace_loss(ours, axis).item() - ref_trace_loss(ours, ref_axis).item()) < 1e-8
    assert ours.dtype == D64


@pytest.mark.parametrize("axis,ref_axis", AXES)
def test_intl_objective_matches_reference_two_view_multicrop_and_ema(axis, ref_axis):
    m, d = 32, 24
    crops = [_z(m, d, seed=s) for s in range(6)]
    beta = intl_beta(m, d, axis)
    for n in (2, 6):
        got = losses.intl_loss(crops[:n], iters=4, axis=axis, beta=beta)["loss"]
        assert abs(got.item() - ref_intl(crops[:n], ref_axis, 4, m, d).item()) < 1e-8
    got = losses.intl_loss(crops[1:], crops[0], iters=4, axis=axis, beta=beta)["loss"]
    assert abs(got.item() - ref_intl_ema(crops[1:], crops[0], ref_axis, 4, m, d).item()) < 1e-8
    # beta=None applies the same rule to the batch it is given
    assert losses.intl_loss(crops[:2], axis=axis)["beta"] == pytest.approx(beta)


def test_norm_mse_and_beta_values():
    a, b = _z(10, 7, 1), _z(10, 7, 2)
    assert abs(norm_mse(a, b).item() - ref_norm_mse(a, b).item()) < 1e-12
    assert norm_mse(a, a).item() == pytest.approx(0.0, abs=1e-12)
    assert norm_mse(a, -a).item() == pytest.approx(4.0)
    assert intl_beta(256, 8192) == pytest.approx(0.05)
    assert intl_beta(512, 8192) == pytest.approx(0.06)
    assert intl_beta(256, 8192, "batch") == pytest.approx(0.10)
    with pytest.raises(ValueError, match="axis"):
        intl_beta(256, 64, "rows")


# ------------------------------------------------------------------------------------------------------
# Theorem 1 and Proposition 2
# ------------------------------------------------------------------------------------------------------
def _batch_data(eigs, m=200, seed=0):
    """m x d data whose batch covariance (centred over the batch, / (m-1)) has exactly ``eigs``."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigs)
    a = torch.randn(m, d, generator=g, dtype=D64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    return math.sqrt(m - 1) * q @ torch.diag(torch.tensor(eigs, dtype=D64).sqrt()) @ u.T - 0.7


def _cov(z, axis):
    return losses.axis_covariance(losses.centre(z, axis), axis)


@pytest.mark.parametrize("iters", [1, 2, 4, 7])
def test_theorem1_output_eigenvalues_are_x_fT_squared(iters):
    eigs = torch.tensor([5.0, 2.0, 1.0, 0.3, 0.05, 0.004], dtype=D64)
    z = _batch_data(eigs.tolist())
    out_eigs = torch.linalg.eigvalsh(_cov(iternorm(z, iters, "batch"), "batch")).flip(0)
    x = eigs / eigs.sum()
    torch.testing.assert_close(out_eigs, x * newton_polynomial(x, iters) ** 2, rtol=1e-9, atol=1e-12)


def test_proposition2_f_T_increases_with_T_and_whitened_eigenvalues_grow_towards_one():
    x = torch.linspace(1e-4, 1.0, 2001, dtype=D64)[:-1]       # x in (0, 1)
    prev = newton_polynomial(x, 0)
    for t in range(1, 12):
        cur = newton_polynomial(x, t)
        assert bool((cur >= prev * (1 - 1e-14)).all()), f"f_{t} is below f_{t - 1} on (0,1)"  # round-off
        # strictly above wherever f_{t-1} has not yet converged to x^-1/2 in float64
        open_ = x * prev ** 2 < 1 - 1e-9
        assert int(open_.sum()) > 0 and bool((cur[open_] > prev[open_]).all()), f"f_{t} not above f_{t - 1}"
        assert bool((x * cur ** 2 <= 1 + 1e-12).all())       # never overshoots whitening
        prev = cur
    # seen through IterNorm: each output eigenvalue grows with T (until it reaches 1 in float64)
    z = _batch_data([4.0, 1.0, 0.2, 0.01])
    spectra = [torch.linalg.eigvalsh(_cov(iternorm(z, t, "batch"), "batch")) for t in (1, 2, 4, 6, 8)]
    for a, b in zip(spectra, spectra[1:]):
        assert bool((b >= a - 1e-12).all()) and bool((b[:2] > a[:2]).all())
    assert spectra[0][0] < 0.005 and spectra[-1][0] > 0.7


def test_uncoupled_newton_iteration_is_unstable_for_large_T_and_the_product_form_is_not():
    """Documented limitation of the paper's (uncoupled) iteration (``iternorm_reference``): once converged,
    round-off in the part of P that does not commute with Sigma grows by |1 - (r + sqrt r)/2| per step
    (r = eigenvalue ratio), so T >> log_1.5(tr/lambda_min) diverges when the condition number exceeds ~2.4.
    ``iternorm`` computes the same polynomial in the product form P_{k+1} = P_k (3 I - Y_k) / 2, whose
    Y_k = P_k^2 Sigma_N -> I converges quadratically: it stays whitened. T = 4-7, where they agree, is safe."""
    z = _batch_data([4.0, 1.0, 0.2, 0.01])

    def err(fn, t):
        return (_cov(fn(z, t, "batch"), "batch") - torch.eye(4, dtype=D64)).abs().max().item()

    assert err(losses.iternorm_reference, 10) < 0.01 and not err(losses.iternorm_reference, 16) < 1.0
    assert err(iternorm, 10) < 0.01 and err(iternorm, 16) < 1e-12 and err(iternorm, 40) < 1e-12


def _eig_reference_matrix(sigma, iters):
    """P_T / sqrt(tr) from an explicit eigendecomposition: U f_T(Lambda / tr) U^T / sqrt(tr)."""
    lam, u = torch.linalg.eigh(sigma)
    tr = sigma.trace()
    return (u * newton_polynomial(lam / tr, iters)) @ u.T / tr.sqrt()


@pytest.mark.parametrize("axis", ["channel", "batch"])
def test_iternorm_equals_eigendecomposition_reference(axis):
    z = _z(20, 30, seed=3)
    zc = losses.centre(z, axis)
    p = _eig_reference_matrix(losses.axis_covariance(zc, axis), 4)
    expected = p @ zc if axis == "channel" else zc @ p
    torch.testing.assert_close(iternorm(z, 4, axis), expected, rtol=0, atol=1e-10)


def test_channel_whitening_is_batch_whitening_of_the_transpose():
    z = _z(12, 33, seed=4)
    torch.testing.assert_close(iternorm(z, 5, "channel"), iternorm(z.T.contiguous(), 5, "batch").T,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("axis", ["channel", "batch"])
def test_many_iterations_converge_to_zca_whitening_and_zero_trace_loss(axis):
    # condition number < 2.4: the iteration stays stable after converging (see the test above)
    z = _batch_data([2.0, 1.6, 1.3, 1.1, 1.0], m=30, seed=5)
    z = z if axis == "batch" else z.T.contiguous()
    zca = losses.power_transform(z, 0.5, axis)
    torch.testing.assert_close(iternorm(z, 60, axis), zca, rtol=0, atol=1e-8)
    assert trace_loss(zca, axis).item() < 1e-18
    n = z.shape[1] if axis == "batch" else z.shape[0]
    torch.testing.assert_close(_cov(zca, axis), torch.eye(n, dtype=D64), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------------
# the fast iternorm (smaller Gram matrix, product form, written-out backward) against the paper's computation
# ------------------------------------------------------------------------------------------------------
def _collapsed(m, d, seed=0):
    """rank-3 embedding plus 1e-6 noise: a near-singular covariance on both axes"""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, 3, generator=g, dtype=D64) @ torch.randn(3, d, generator=g, dtype=D64)
            + 1e-6 * torch.randn(m, d, generator=g, dtype=D64))


def _value_and_grad(fn, z, upstream, *args):
    z = z.clone().requires_grad_()
    out = fn(z, *args)
    (out * upstream).sum().backward()
    return out.detach(), z.grad


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# m <= d (m x m Gram), m > d (d x d Gram), >= 128 rows (the blocked Gram), a singular covariance on the
# whitened axis, a near-collapsed embedding
EQUALITY_INPUTS = {
    "16x40": lambda: _z(16, 40, seed=1), "48x12": lambda: _z(48, 12, seed=2), "20x20": lambda: _z(20, 20, seed=3),
    "160x300": lambda: _z(160, 300, seed=4), "300x160": lambda: _z(300, 160, seed=5),
    "collapsed 40x64": lambda: _collapsed(40, 64), "collapsed 64x40": lambda: _collapsed(64, 40, seed=1),
}


@pytest.mark.parametrize("axis", ["channel", "batch"])
@pytest.mark.parametrize("case", sorted(EQUALITY_INPUTS))
def test_iternorm_equals_the_papers_computation_outputs_and_gradients(axis, case):
    z = EQUALITY_INPUTS[case]()
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(9), dtype=D64)
    worst = 0.0
    for iters in (0, 1, 2, 3, 4, 5, 7):
        out, grad = _value_and_grad(iternorm, z, upstream, iters, axis)
        ref_out, ref_grad = _value_and_grad(losses.iternorm_reference, z, upstream, iters, axis)
        assert out.dtype == D64 and _rel(out, ref_out) < 1e-10, (iters, _rel(out, ref_out))
        assert _rel(grad, ref_grad) < 1e-10, (iters, _rel(grad, ref_grad))
        worst = max(worst, _rel(out, ref_out), _rel(grad, ref_grad))
    # and the official code's formulation (autograd through its baddbmm / matrix_power iteration)
    ref_axis = 0 if axis == "channel" else 1
    oracle_out, oracle_grad = _value_and_grad(ref_iternorm, z, upstream, ref_axis, 4)
    out, grad = _value_and_grad(iternorm, z, upstream, 4, axis)
    assert _rel(out, oracle_out) < 1e-10 and _rel(grad, oracle_grad) < 1e-10
    print(f"{case} {axis}: largest relative difference to iternorm_reference over T=0..7 {worst:.1e}")


def test_iternorm_backward_passes_gradcheck_and_without_grad_is_the_same_output():
    for axis in ("channel", "batch"):
        for shape in ((6, 9), (9, 6)):
            z = _z(*shape, seed=11).requires_grad_()
            assert torch.autograd.gradcheck(iternorm, (z, 3, axis), eps=1e-6, atol=1e-7)
            with torch.no_grad():
                torch.testing.assert_close(iternorm(z, 3, axis), iternorm(z.detach(), 3, axis), rtol=0, atol=0)
    with pytest.raises(ValueError, match="iters must be >= 0"):
        iternorm(_z(4, 6), -1)


# ------------------------------------------------------------------------------------------------------
# precision
# ------------------------------------------------------------------------------------------------------
def test_dtypes_and_autocast():
    z32 = _z(16, 24, dtype=torch.float32)
    assert iternorm(z32).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = nn.Linear(24, 24)(z32)
        assert zb.dtype == torch.bfloat16
        out = iternorm(zb)
        assert out.dtype == torch.float32
        assert trace_loss(out).dtype == torch.float32
        assert losses.intl_loss([zb, zb * 1.1])["loss"].dtype == torch.float32
    torch.testing.assert_close(out, iternorm(zb.float()), rtol=0, atol=0)
    # and the float32 result is close to the float64 one
    torch.testing.assert_close(iternorm(z32), iternorm(z32.double()).float(), rtol=1e-4, atol=1e-5)
    # the backward under autocast (the engine calls backward outside it; a caller may not) is float32 too
    lin = nn.Linear(24, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trace_loss(iternorm(lin(z32)))
        loss.backward()
    assert lin.weight.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()


def test_bad_shapes_and_axes_are_named():
    with pytest.raises(ValueError, match="2-D"):
        iternorm(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="axis"):
        iternorm(torch.zeros(3, 4), axis="features")
    with pytest.raises(ValueError, match="at least 2 views"):
        losses.intl_loss([torch.randn(8, 4)])


# ------------------------------------------------------------------------------------------------------
# spectral transformation (power family)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("power", [0.0, 0.25, 0.5, 1.0])
def test_power_transform_output_spectrum_is_lambda_to_one_minus_2p(power):
    eigs = torch.tensor([3.0, 1.0, 0.2], dtype=D64)
    z = _batch_data(eigs.tolist(), m=50)
    out = torch.linalg.eigvalsh(_cov(losses.power_transform(z, power, "batch"), "batch")).flip(0)
    expected = (eigs ** (1 - 2 * power)).sort(descending=True).values
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


def test_power_transform_guards():
    z = _z(8, 20)  # batch covariance 20 x 20 of rank 7: clamped, finite
    out = losses.power_transform(z, 0.5, "batch", eps=1e-6)
    assert torch.isfinite(out).all()
    bad = z.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(losses.EighFailure, match="non-finite embedding covariance"):
        losses.power_transform(bad, 0.5, "batch")


def test_power_transform_reports_a_failed_eigendecomposition(monkeypatch):
    def failing_eigh(_):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    with pytest.raises(losses.EighFailure, match=r"failed to converge.*covariance \(12, 12\).*method=intl"):
        losses.power_transform(_z(30, 12), 0.5, "batch")


# ------------------------------------------------------------------------------------------------------
# FroSSL, Barlow Twins, VICReg
# ------------------------------------------------------------------------------------------------------
def test_frossl_gram_forms_agree_and_normalisation():
    for m, d in [(10, 30), (30, 10)]:
        z = losses.variance_normalise(_z(m, d, seed=6))
        torch.testing.assert_close(z.var(0), torch.full((d,), d / (m - 1), dtype=D64))
        # the kernel normalised by its trace (the authors' code), which is d^2 for sqrt(d)-norm columns
        dd = 2 * torch.log(torch.linalg.matrix_norm(z.T @ z / d ** 2))
        mm = 2 * torch.log(torch.linalg.matrix_norm(z @ z.T / d ** 2))
        assert losses.log_frobenius_sq(z).item() == pytest.approx(dd.item(), rel=1e-12)
        assert dd.item() == pytest.approx(mm.item(), rel=1e-12)
    a, b = _z(16, 8, 1), _z(16, 8, 2)
    out = losses.frossl_loss([a, b])
    na, nb = losses.variance_normalise(a), losses.variance_normalise(b)
    expected = F.mse_loss(na, nb) + losses.log_frobenius_sq(na) + losses.log_frobenius_sq(nb)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_barlow_twins_matches_batchnorm_formulation():
    a, b = _z(32, 6, 1), _z(32, 6, 2)
    bn = nn.BatchNorm1d(6, affine=False).double()
    c = bn(a).T @ bn(b) / 32
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    got = losses.barlow_twins_loss([a, b])
    assert got["loss"].item() == pytest.approx((on + 0.0051 * off).item(), rel=1e-10)


def test_vicreg_matches_published_formula_and_trace_option():
    a, b = _z(32, 6, 1), _z(32, 6, 2)
    rep = F.mse_loss(a, b)
    ac, bc = a - a.mean(0), b - b.mean(0)
    std = lambda x: torch.sqrt(x.var(0) + 1e-4)  # noqa: E731
    std_loss = F.relu(1 - std(ac)).mean() / 2 + F.relu(1 - std(bc)).mean() / 2
    cov = lambda x: x.T @ x / 31  # noqa: E731
    off = lambda c: (c - torch.diag(torch.diagonal(c))).pow(2).sum() / 6  # noqa: E731
    expected = 25 * rep + 25 * std_loss + off(cov(ac)) + off(cov(bc))
    assert losses.vicreg_loss([a, b])["loss"].item() == pytest.approx(expected.item(), rel=1e-10)
    with_tl = losses.vicreg_loss([a, b], trace_beta=0.05)
    extra = 0.05 * (trace_loss(a) + trace_loss(b))
    assert with_tl["loss"].item() == pytest.approx((expected + extra).item(), rel=1e-10)
    assert with_tl["trace"].item() == pytest.approx(extra.item(), rel=1e-10)


# ------------------------------------------------------------------------------------------------------
# every objective decreases over a few optimisation steps (solo-learn style)
# ------------------------------------------------------------------------------------------------------
OBJECTIVES = {
    "intl": lambda v: losses.intl_loss(v, beta=0.05),
    "intl_batch": lambda v: losses.intl_loss(v, axis="batch", beta=0.02),
    "iternorm_only": lambda v: losses.intl_loss(v, beta=0.0),
    "trace_only": lambda v: losses.intl_loss(v, beta=0.05, whiten=False),
    "st_power": lambda v: losses.st_power_loss(v, power=0.5),
    "frossl": lambda v: losses.frossl_loss(v),
    "barlow_twins": lambda v: losses.barlow_twins_loss(v),
    "vicreg": lambda v: losses.vicreg_loss(v),
    "vicreg_trace": lambda v: losses.vicreg_loss(v, trace_beta=0.05),
    "intl_ema": lambda v: losses.intl_loss(v[1:], v[0].detach(), beta=0.05),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_falls_over_a_few_steps(name):
    torch.manual_seed(0)
    fn = OBJECTIVES[name]
    x = torch.randn(32, 16)
    proj = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24))
    opt = torch.optim.SGD(proj.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    noise = [0.3 * torch.randn(32, 16, generator=g) for _ in range(3)]
    values = []
    for _ in range(20):
        out = fn([proj(x + n) for n in noise])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        values.append(out["loss"].item())
    assert all(math.isfinite(v) for v in values)
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 0.05 * abs(first), f"{name}: loss {first:.4f} -> {last:.4f} did not fall"


# ------------------------------------------------------------------------------------------------------
# intl_loss from Gram matrices (channel whitening, the default) against the definition on whitened outputs
# ------------------------------------------------------------------------------------------------------
def _loss_and_grads(views, target, **kw):
    views = [v.clone().requires_grad_() for v in views]
    out = losses.intl_loss(views, target, **kw)
    out["loss"].backward()
    return out, [v.grad for v in views]


# (m, d, crops, EMA, beta): 2 views, multi-crop, the EMA variant, >= 128 rows (blocked Gram), beta = 0, m = d
FUSED_CASES = [(16, 40, 2, False, None), (16, 40, 6, False, None), (16, 40, 3, True, None),
               (160, 300, 2, False, None), (130, 300, 4, True, 0.3), (24, 64, 2, False, 0.0), (20, 20, 3, False, None)]


@pytest.mark.parametrize("m,d,n,ema,beta", FUSED_CASES)
def test_intl_loss_from_grams_equals_the_loss_of_the_whitened_outputs(m, d, n, ema, beta):
    crops = [_z(m, d, seed=20 + s) for s in range(n)]
    crops[1] = crops[0] + 0.3 * crops[1]  # a correlated pair: cosines far from 0
    target, views = (crops[0], crops[1:]) if ema else (None, crops)
    for iters in (1, 4):
        fused, grads = _loss_and_grads(views, target, iters=iters, beta=beta, fused=True)
        plain, ref_grads = _loss_and_grads(views, target, iters=iters, beta=beta)
        for key in ("loss", "align", "trace"):
            assert abs(fused[key].item() - plain[key].item()) <= 1e-10 * max(1.0, abs(plain[key].item())), key
        assert fused["beta"] == plain["beta"]
        for g, ref in zip(grads, ref_grads):
            assert _rel(g, ref) < 1e-10
    # and the official code's formulation, loss and gradients (only the online views get gradients with EMA)
    beta_ref = intl_beta(m, d) if beta is None else beta
    oracle_views = [v.clone().requires_grad_() for v in views]
    if ema:
        oracle = (sum(ref_norm_mse(ref_iternorm(q, 0, 4), ref_iternorm(target, 0, 4))
                      + beta_ref * ref_trace_loss(ref_iternorm(q, 0, 4), 0) for q in oracle_views) / len(views))
    else:
        t = [ref_iternorm(c, 0, 4) for c in oracle_views]
        oracle = sum(ref_norm_mse(t[i], t[0]) + beta_ref * (ref_trace_loss(t[i], 0) + ref_trace_loss(t[0], 0))
                     for i in range(1, n)) / (n - 1)
    oracle.backward()
    fused, grads = _loss_and_grads(views, target, iters=4, beta=beta, fused=True)
    assert abs(fused["loss"].item() - oracle.item()) < 1e-10
    assert all(_rel(g, v.grad) < 1e-10 for g, v in zip(grads, oracle_views))


def test_intl_loss_from_grams_in_float32_and_on_a_collapsed_embedding():
    """float32 (what training runs) against float64, on an ordinary and a near-collapsed pair of views; and
    bfloat16 inputs from autocast are computed in float32 like the other path."""
    for a, b in ((_z(64, 256, seed=1), _z(64, 256, seed=2)), (_collapsed(64, 256), _collapsed(64, 256, seed=1))):
        b = a + 0.5 * b
        for fused in (True, False):
            got, grads = _loss_and_grads([a.float(), b.float()], None, fused=fused)
            want, ref_grads = _loss_and_grads([a, b], None, fused=fused)
            assert got["loss"].dtype == torch.float32
            assert abs(got["loss"].item() - want["loss"].item()) < 1e-4 * max(1.0, abs(want["loss"].item()))
            for g, ref in zip(grads, ref_grads):
                assert _rel(g.double(), ref) < 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = nn.Linear(64, 64)
        x = _z(16, 64, dtype=torch.float32)
        za, zb = lin(x), lin(x * 1.1)
        assert za.dtype == torch.bfloat16
        assert losses.intl_loss([za, zb], fused=True)["loss"].dtype == torch.float32
    torch.testing.assert_close(losses.intl_loss([za, zb], fused=True)["loss"],
                               losses.intl_loss([za.float(), zb.float()], fused=True)["loss"])


def test_intl_loss_fused_only_where_it_applies_and_method_fused_reaches_it():
    wide, tall = [_z(8, 16, seed=s) for s in range(2)], [_z(16, 8, seed=s) for s in range(2)]
    for views, kw in ((tall, {}), (wide, {"axis": "batch"}), (wide, {"whiten": False})):
        with pytest.raises(ValueError, match="fused=True needs channel whitening.*fix: set method.fused=false"):
            losses.intl_loss(views, fused=True, **kw)
    # the method's config key: method.fused=true takes the Gram path (it refuses the tall batch), false the outputs'
    from pretrain.methods import build_method
    for name in ("intl", "iternorm_only"):
        fused, plain = (build_method({"name": name, "fused": f}, global_batch=8) for f in (True, False))
        assert abs(fused(wide)["loss"].item() - plain(wide)["loss"].item()) < 1e-12
        plain(tall)
        with pytest.raises(ValueError, match="fused=True needs channel whitening"):
            fused(tall)
    with pytest.raises(ValueError, match="fused=True is invalid; expected true or false, and true only with axis"):
        build_method({"name": "intl", "fused": True, "axis": "batch"}, global_batch=8)
