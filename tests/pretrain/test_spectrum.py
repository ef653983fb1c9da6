import math

import pytest
import torch

from pretrain.spectrum import (
    condition_number,
    covariance_spectrum,
    effective_rank,
    eigenvalue_entropy,
    lg_ioc,
    saturation_step,
    top_k,
)


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


# ------------------------------------------------------------------ FroSSL's top-k spectrum dynamics
def test_top_k_condition_number_and_entropy_on_a_hand_made_spectrum():
    eigs = torch.tensor([1.0, 4.0, 1.0, 2.0])  # unsorted on purpose: 4, 2, 1, 1
    assert top_k(eigs, 3).tolist() == [4.0, 2.0, 1.0] and top_k(eigs, 9).tolist() == [4.0, 2.0, 1.0, 1.0]
    assert top_k(eigs, 3).dtype == torch.float64
    assert condition_number(eigs, 3) == 4.0 and condition_number(eigs, 2) == 2.0 and condition_number(eigs, 1) == 1.0
    assert condition_number(eigs, 14) == 4.0  # fewer than k eigenvalues: the smallest there is
    # entropy of (4, 2, 1) / 7, written out by hand
    want3 = -(4 / 7 * math.log(4 / 7) + 2 / 7 * math.log(2 / 7) + 1 / 7 * math.log(1 / 7))
    assert eigenvalue_entropy(eigs, 3) == pytest.approx(want3, rel=1e-12)
    want_all = -(4 / 8 * math.log(4 / 8) + 2 / 8 * math.log(2 / 8) + 2 * (1 / 8 * math.log(1 / 8)))
    assert eigenvalue_entropy(eigs) == pytest.approx(want_all, rel=1e-12) == pytest.approx(1.2130075659799042)
    assert effective_rank(eigs) == pytest.approx(math.exp(want_all), rel=1e-12)  # one helper, one definition


def test_isotropic_and_collapsed_spectra():
    iso = torch.full((20,), 0.3)
    assert condition_number(iso, 14) == pytest.approx(1.0)
    assert eigenvalue_entropy(iso, 14) == pytest.approx(math.log(14))
    collapsed = torch.tensor([5.0, 0.0, 0.0])
    assert condition_number(collapsed, 2) == math.inf and condition_number(torch.zeros(4), 2) == math.inf
    assert eigenvalue_entropy(collapsed, 3) == 0.0 and eigenvalue_entropy(torch.zeros(3)) == 0.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            condition_number(iso, bad)


def test_covariance_spectrum_feeds_the_condition_number():
    z = _data_with_covariance([8.0, 4.0, 2.0, 1.0, 0.5])
    assert condition_number(covariance_spectrum(z), 3) == pytest.approx(4.0, rel=1e-9)
    assert condition_number(covariance_spectrum(z), 5) == pytest.approx(16.0, rel=1e-9)


def _rows(values, k=3, every=10):
    """metrics rows whose k-th top eigenvalue follows ``values`` (lambda_1 = 1 throughout)."""
    return [{"step": every * (i + 1), "top_eigenvalues": [1.0] * (k - 1) + [v]} for i, v in enumerate(values)]


def test_saturation_step_is_where_lambda_k_settles_within_ten_percent_of_its_end():
    # rises into 1.0; the spike at step 30 (0.95) falls back out of the band, so it does not count
    rows = _rows([0.01, 0.1, 0.95, 0.5, 0.85, 0.93, 1.05, 1.0])
    assert saturation_step(rows, 3) == 60  # step 50 (0.85) is out (< 0.9); 0.93, 1.05, 1.0 stay in [0.9, 1/0.9]
    # shrinks into its final value (a whitened run): two-sided, the first row in [0.9 v, v / 0.9] for good
    assert saturation_step(_rows([10.0, 3.0, 1.2, 1.1, 1.0]), 3) == 40
    assert saturation_step(_rows([1.0, 1.0, 1.0]), 3) == 10  # flat from the start
    assert saturation_step(_rows([0.2, 0.5, 0.7]), 3) == 30  # still rising at the end: the last row
    assert saturation_step(_rows([0.2, 0.5, 0.7]), 3, band=0.5) == 20
    # too few rows, rows without the key or with fewer than k values, a collapsed end: None
    assert saturation_step(_rows([1.0]), 3) is None and saturation_step([], 3) is None
    assert saturation_step([{"step": 1, "loss": 2.0}, *_rows([1.0, 1.0], k=2)], 3) is None
    assert saturation_step(_rows([1.0, 0.0]), 3) is None
    mixed = [{"step": 5, "loss": 1.0}, *_rows([0.1, 1.0, 1.0])]  # loss-only rows are skipped
    assert saturation_step(mixed, 3) == 20
