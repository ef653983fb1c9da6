import math

import pytest
import torch

from pretrain.spectrum import covariance_spectrum, effective_rank, lg_ioc


def _data_with_covariance(eigs, m=64, seed=0):
    """m samples whose (unbiased, batch-centred) covariance has exactly the eigenvalues ``eigs``."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigs)
    a = torch.randn(m, d, generator=g, dtype=torch.float64)
    a = a - a.mean(0)
    q, _ = torch.linalg.qr(a)                                   # orthonormal columns, orthogonal to 1
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return math.sqrt(m - 1) * q @ torch.diag(torch.tensor(eigs, dtype=torch.float64).sqrt()) @ u.T + 3.0


def test_covariance_spectrum_recovers_known_eigenvalues_sorted():
    eigs = [0.5, 4.0, 1e-3, 2.0]
    z = _data_with_covariance(eigs)
    got = covariance_spectrum(z.float().requires_grad_())
    assert got.dtype == torch.float64 and not got.requires_grad
    torch.testing.assert_close(got, torch.tensor(sorted(eigs, reverse=True), dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def test_wide_embeddings_keep_only_the_eigenvalues_a_batch_can_make_non_zero():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(10, 50, generator=g, dtype=torch.float64)
         @ torch.diag(torch.linspace(0.5, 2.0, 50, dtype=torch.float64)))
    got = covariance_spectrum(z)
    zc = z - z.mean(0)
    full = torch.linalg.eigvalsh(zc.T @ zc / 9).flip(0)  # 50 eigenvalues, 41 of them zero by construction
    assert got.shape == (9,) and bool((got > 1e-6).all())
    torch.testing.assert_close(got, full[:9])
    assert -3.0 < lg_ioc(got) < 0.0  # the full spectrum would say "collapsed" (about -15.7) for any batch
    assert lg_ioc(full) < -12.0
    assert covariance_spectrum(z[:, :9]).shape == (9,) and covariance_spectrum(z[:, :5]).shape == (5,)


def test_effective_rank_and_lg_ioc():
    assert effective_rank(torch.ones(8)) == pytest.approx(8.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = torch.tensor([0.7, 0.2, 0.1])
    assert effective_rank(p * 5) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert effective_rank(torch.zeros(3)) == 0.0
    assert lg_ioc(torch.tensor([10.0, 1.0, 0.1])) == pytest.approx(-2.0)
    assert lg_ioc(torch.ones(4)) == pytest.approx(0.0)
    # a collapsed direction is clamped at float64 eps relative to lambda_max, not -inf
    assert lg_ioc(torch.tensor([1.0, 0.0])) == pytest.approx(math.log10(torch.finfo(torch.float64).eps))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="samples, features"):
        covariance_spectrum(torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        covariance_spectrum(torch.zeros(1, 3))
