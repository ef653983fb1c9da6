"""The benchmarks must not rot: run each once at tiny sizes, check what they write; unit-test the pieces
that turn timings into ratios and failures into counts."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.baselines import zca_whiten
from benchmarks.bench_whitening import _outcome, ill_conditioned
from benchmarks.common import Row, add_ratios, interleaved
from pretrain.losses import iternorm

ROOT = Path(__file__).resolve().parents[2]


def test_python_m_benchmarks_quick_writes_json_markdown_png(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path), "--name", "smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    benches = {r["benchmark"] for r in result["rows"]}
    assert benches == {"whitening", "whitening-robustness", "step", "probe", "pipeline"}
    for r in result["rows"]:
        assert r["values"] and all(math.isfinite(v) for v in r["values"])
        assert r["ratio"] is not None and math.isfinite(r["ratio"]) and r["ratio"] > 0
    assert result["machine"]["cpus_usable"] >= 1 and result["settings"]["quick"] is True
    step_intl = [r for r in result["rows"]
                 if r["benchmark"] == "step" and r["baseline"] and "peak_rss_mb" in r["extra"]]
    assert len(step_intl) == 1 and step_intl[0]["extra"]["peak_rss_mb"] > 50
    assert math.isfinite(step_intl[0]["extra"]["overhead_pct_objective"])
    md = (tmp_path / "smoke.md").read_text()
    assert "| benchmark | case | variant |" in md and "## Machine" in md and "peak RSS" in md
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert "[pipeline]" in proc.stdout and "repeat 1/1" in proc.stdout  # progress lines


def test_unknown_benchmark_is_a_clear_usage_error(capsys):
    from benchmarks.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--only", "pipelin"])
    assert e.value.code == 2 and "unknown benchmark(s) ['pipelin']" in capsys.readouterr().err
    assert parse_args(["--only", "step,pipeline"]).only == ["step", "pipeline"]


def test_ratios_are_speedups_over_the_baseline():
    rows = add_ratios([
        Row("b", "c", "base", "ms", [10.0, 12.0, 11.0]),
        Row("b", "c", "fast", "ms", [5.0, 6.0, 5.5], baseline="base"),
        Row("p", "c", "base", "img/s", [100.0], higher_is_better=True),
        Row("p", "c", "fast", "img/s", [250.0], baseline="base", higher_is_better=True),
    ])
    assert [r.ratio for r in rows] == [1.0, 2.0, 1.0, 2.5]


def test_interleaved_runs_warmup_then_repeats_in_turn():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4 and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_robustness_outcomes_are_counted_from_real_failures():
    z = ill_conditioned("gaussian", 8, 32, seed=0)  # batch whitening with d > m: singular covariance
    status, _ = _outcome(lambda x: zca_whiten(x, "batch"), z)
    assert status in ("nonfinite_output", "nonfinite_grad", "eigh_error")
    status, gmax = _outcome(lambda x: iternorm(x, 4, "batch"), z)
    assert status == "ok" and gmax is not None and math.isfinite(gmax)
    ok, _ = _outcome(lambda x: zca_whiten(x, "batch"), torch.randn(64, 8))  # well-conditioned: fine
    assert ok == "ok"


def test_zca_baseline_whitens():
    z = torch.randn(256, 16, dtype=torch.float64)
    w = zca_whiten(z, "batch")
    cov = w.T @ w / (256 - 1)
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-8)
