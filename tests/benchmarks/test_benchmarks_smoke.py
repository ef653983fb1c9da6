"""The benchmarks must not rot: run each once at tiny sizes, check what they write; unit-test the pieces
that turn timings into ratios and failures into counts."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.baselines import cholesky_whiten, zca_whiten
from benchmarks.bench_whitening import METHODS, _outcome, ill_conditioned
from benchmarks.common import Row, add_ratios, interleaved
from pretrain.losses import iternorm

ROOT = Path(__file__).resolve().parents[2]


def test_python_m_benchmarks_quick_writes_json_markdown_png(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path), "--name", "smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    benches = {r["benchmark"] for r in result["rows"]}
    assert benches == {"whitening", "intl-objective", "whitening-robustness", "step", "probe", "pipeline",
                       "pipeline-profile", "allocator", "threads", "compile"}
    for r in result["rows"]:
        assert r["values"] and all(math.isfinite(v) for v in r["values"])
        assert r["ratio"] is not None and math.isfinite(r["ratio"]) and r["ratio"] > 0
    assert result["machine"]["cpus_usable"] >= 1 and result["settings"]["quick"] is True
    step_intl = [r for r in result["rows"]
                 if r["benchmark"] == "step" and r["baseline"] and "peak_rss_mb" in r["extra"]]
    assert len(step_intl) == 1 and step_intl[0]["extra"]["peak_rss_mb"] > 50
    assert math.isfinite(step_intl[0]["extra"]["overhead_pct_objective"])
    alloc = [r for r in result["rows"] if r["benchmark"] == "allocator"]
    assert len(alloc) == 2 and all(r["extra"]["peak_rss_mb"] > 50 and r["extra"]["page_faults_per_step"] >= 0
                                   for r in alloc)
    assert {r["extra"]["processes"] for r in result["rows"] if r["benchmark"] == "threads"} == {1, 2}
    ops = {r["variant"].split(": ", 1)[1] for r in result["rows"]
           if r["benchmark"] == "pipeline-profile" and r["variant"].startswith("pretrain.augment: ")}
    assert {"sample", "decode", "crop+resize", "to-tensor+normalise", "collate"} <= ops
    md = (tmp_path / "smoke.md").read_text()
    assert "| benchmark | case | variant |" in md and "## Machine" in md and "peak RSS" in md
    assert "profile, pretrain.augment: operation" in md and "page faults" in md
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert "(compiled in " in md  # the compile benchmark's first call is timed on its own
    # the whitening table: every method's time on every case, and its failures on every ill-conditioned case
    section = md[md.index("## Whitening"):md.index("## Machine")]
    for name in METHODS:
        assert section.count(f"| {name} |") == 2, name
    assert "IterNorm T=4, the paper's computation |" in section and "repeated" in section
    objective = [r for r in result["rows"] if r["benchmark"] == "intl-objective"]
    assert len(objective) == 3 and sum(r["baseline"] is None for r in objective) == 1
    assert (tmp_path / "smoke-whitening.png").stat().st_size > 1000
    assert "[pipeline]" in proc.stdout and "repeat 1/1" in proc.stdout  # progress lines


def test_gpu_check_quick_runs_the_engine_step_and_the_loader_and_says_what_it_measured(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--gpu", "--quick", "--out", str(tmp_path), "--name",
                           "gpu"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    steps = [r for r in rows if r["unit"] == "img/s per GPU"]
    loader = [r for r in rows if r["unit"] == "img/s (whole loader)"]
    assert {r["variant"].split(",")[1].strip() for r in steps} == {"contiguous", "channels_last"}
    assert len(steps) == 4 and sum("torch.compile" in r["variant"] for r in steps) == 2
    assert len(loader) == 1 and all(v > 0 for r in rows for v in r["values"])
    verdict = loader[0]["extra"]["notes"][-1]
    assert "the loader (" in verdict and ("keeps up" in verdict or "does NOT keep up" in verdict)
    if not torch.cuda.is_available():
        assert "no CUDA" in proc.stdout and "CPU (no CUDA" in steps[0]["case"]
    assert verdict in (tmp_path / "gpu.md").read_text()


def test_allocator_and_thread_candidates():
    from benchmarks import bench_allocator, bench_threads
    from common.cpu_env import MALLOC_ENV, OPT_OUT_ENV

    logged = []
    found = {"libjemalloc.so.2": Path("/lib/libjemalloc.so.2")}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bench_allocator, "find_library", found.get)
        cands = bench_allocator.candidates(logged.append)
    base = cands[bench_allocator.BASELINE]
    assert base[OPT_OUT_ENV] == "default" and all(base[k] is None for k in (*MALLOC_ENV, "LD_PRELOAD"))
    env_cand = next(v for k, v in cands.items() if "as env" in k)
    assert {k: env_cand[k] for k in MALLOC_ENV} == MALLOC_ENV and env_cand[OPT_OUT_ENV] == "default"
    runtime = next(v for k, v in cands.items() if "run time" in k)
    assert runtime[OPT_OUT_ENV] is None and runtime["LD_PRELOAD"] is None
    assert [v["LD_PRELOAD"] for k, v in cands.items() if k.startswith("jemalloc")] == ["/lib/libjemalloc.so.2"]
    assert not any(k.startswith("tcmalloc") for k in cands) and "apt-get install libtcmalloc-minimal4" in logged[0]
    splits = [(p, t) for p, t, _ in bench_threads.candidates(2).values()]
    assert splits == [(2, None), (2, 2), (2, 2), (1, 2), (1, 2)]
    assert [t for _, t, _ in bench_threads.candidates(8).values()] == [None, 8, 8, 8, 8]


def test_unknown_benchmark_is_a_clear_usage_error(capsys):
    from benchmarks.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--only", "pipelin"])
    assert e.value.code == 2 and "unknown benchmark(s) ['pipelin']" in capsys.readouterr().err
    assert parse_args(["--only", "step,pipeline"]).only == ["step", "pipeline"]
    assert "gpu" not in parse_args([]).only and parse_args(["--gpu"]).only == ["gpu"]


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
    assert status in ("nonfinite_output", "nonfinite_grad", "linalg_error")
    status, gmax = _outcome(lambda x: iternorm(x, 4, "batch"), z)
    assert status == "ok" and gmax is not None and math.isfinite(gmax)
    ok, _ = _outcome(lambda x: zca_whiten(x, "batch"), torch.randn(64, 8))  # well-conditioned: fine
    assert ok == "ok"


def test_every_baseline_whitens_a_well_conditioned_input_along_both_axes():
    z = torch.randn(256, 16, dtype=torch.float64)
    eye = torch.eye(16, dtype=torch.float64)
    for name, whiten in (("zca", lambda x, a: zca_whiten(x, a)),
                         ("zca ridge", lambda x, a: zca_whiten(x, a, eps=1e-12, dtype=torch.float64)),
                         ("zca floor", lambda x, a: zca_whiten(x, a, floor=1e-12, dtype=torch.float64)),
                         ("cholesky", lambda x, a: cholesky_whiten(x, a, ridge=1e-12, dtype=torch.float64))):
        w = whiten(z, "batch")
        assert torch.allclose(w.T @ w / (256 - 1), eye, atol=1e-8), name
        wc = whiten(z.T.contiguous(), "channel")  # rows centred over features, m x m covariance / (d - 1)
        assert torch.allclose(wc @ wc.T / (256 - 1), eye, atol=1e-8), name


def test_ill_conditioned_inputs_have_the_spectrum_they_name_and_failures_are_classified():
    for axis, (m, d) in (("batch", (64, 8)), ("channel", (8, 64))):
        z = ill_conditioned("repeated", m, d, seed=0, axis=axis).double()
        zc = z - z.mean(dim=0 if axis == "batch" else 1, keepdim=True)
        cov = zc.T @ zc / (m - 1) if axis == "batch" else zc @ zc.T / (d - 1)
        expected = torch.tensor([0.5, 1, 2, 4], dtype=torch.float64).repeat_interleave(2)
        torch.testing.assert_close(torch.linalg.eigvalsh(cov), expected, rtol=1e-5, atol=1e-5)
    singular = ill_conditioned("gaussian", 8, 32, seed=0)  # batch covariance 32 x 32 of rank 7
    no_ridge = _outcome(lambda x: cholesky_whiten(x, "batch", ridge=0.0, dtype=torch.float64), singular)
    assert no_ridge == ("linalg_error", None)
    status, gmax = _outcome(lambda x: cholesky_whiten(x, "batch", ridge=1e-3), singular)
    assert status == "ok" and gmax > 0


def test_the_whitening_figure_name_does_not_repeat_the_benchmark():
    from benchmarks.report import whitening_figure_name

    assert whitening_figure_name("2026-12-03") == "2026-12-03-whitening.png"
    assert whitening_figure_name("2026-12-03-whitening") == "2026-12-03-whitening-summary.png"
