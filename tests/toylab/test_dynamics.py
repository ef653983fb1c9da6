"""FroSSL's training dynamics (Section 5), linear regime: the one command and the paper's finding at toy scale."""

import json
import math

import pytest

from toylab.dynamics import LinearConfig, linear_loss, main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_losses_are_zero_at_their_targets():
    import torch

    n, d = 64, 3
    q, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64))
    f = q * math.sqrt(n)  # Z = f / sqrt(n) has Z^T Z = I
    assert float(linear_loss("frossl", f, f)) == pytest.approx(0.0, abs=1e-9)
    assert float(linear_loss("barlow", f, f)) == pytest.approx(0.0, abs=1e-9)
    assert float(linear_loss("frossl", f, -f)) == pytest.approx(4.0 * d)  # ||Z1 - Z2||^2 = ||2Z||^2 = 4 d
    with pytest.raises(ValueError, match="unknown linear method"):
        linear_loss("simclr", f, f)


def test_quick_linear_regime_frossl_variant_saturates_before_barlow_twins(synthetic_root, tmp_path):
    out = tmp_path / "dyn"
    assert main(["--quick", "--skip-nonlinear", "--out", str(out), "--data",
                 str(synthetic_root / "classification")]) == 0
    res = json.loads((out / "results.json").read_text())["linear"]
    assert res["config"]["n"] == 1024 and res["config"]["dim"] == 2
    r = res["results"]
    for name in ("linear_loss.png", "linear_eigenvalues.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| FroSSL variant (Eq. 8) |" in (out / "results.md").read_text()
    for m in ("frossl", "barlow", "intl"):
        assert all(math.isfinite(x) for x in r[m]["loss"]) and len(r[m]["t"]) == len(r[m]["eigenvalues"])
    # measured (quick: n 1024, hidden 32, d 2, init 0.1, lr 0.025, t = lr x step up to 60, seed 0):
    # FroSSL variant: lambda_1 1.47e-6 -> 0.824, half of it at t = 35, saturated at t = 45.25;
    # Barlow Twins variant: lambda_1 1.47e-6 -> 1.16e-5 at t = 60 (x8), not learned, nothing saturates.
    # (INTL: lambda_1 -> 0.089, half at t = 23; its loss is scale-free, so the scale drifts: saturated at 60.)
    fro, bt = r["frossl"], r["barlow"]
    assert fro["saturation_t"][0] is not None and fro["saturation_t"][0] < 55, fro["saturation_t"]
    assert bt["saturation_t"][0] is None or bt["saturation_t"][0] > fro["saturation_t"][0], bt["saturation_t"]
    assert fro["learned"] > bt["learned"]
    assert fro["final_eigenvalues"][0] > 0.5 and bt["final_eigenvalues"][0] < 1e-3


def test_bad_arguments_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path / "nope")])
    assert e.value.code == 2 and "make data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--lr", "0"])
    assert "--lr" in capsys.readouterr().err


def test_default_linear_setting_is_the_papers_size():
    cfg = LinearConfig()
    assert cfg.n == 1024 and cfg.t_max / cfg.lr <= 5000  # full-batch GD on 1024 images, minutes on 2 cores
