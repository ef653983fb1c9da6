"""``python -m benchmarks`` (``make bench``): runs every benchmark, writes the results.

Outputs (atomically) ``benchmarks/results/<YYYY-MM-DD>.json`` (every repeat, the machine description),
``<date>.md`` (the table: median, min, max, ratio to the baseline) and ``<date>.png`` (the ratios).
Benchmarks: ``whitening`` (IterNorm vs eigendecomposition: time and robustness counts), ``objective`` (the INTL
objective from Gram matrices vs the paper's computation), ``step`` (full
INTL training step vs a trivial loss, peak RSS), ``probe`` (the step with the monitor's online probe vs
without), ``pipeline`` (pretraining augmentation, images/s/core,
vs the reference code's PIL pipeline, and its per-operation profile), ``compile`` (the step with ``torch.compile``
of the network vs eager, and the objective alone), ``allocator`` (the engine's step under glibc's default malloc vs
``common.cpu_env``'s settings, jemalloc, tcmalloc), ``threads`` (processes x threads of a CPU gloo run). ``--gpu``
runs the GPU-node check instead (``gpu``: the engine step with channels_last / torch.compile, the loader's
images/s, whether it keeps up; the CPU when there is no CUDA). ``--quick`` runs each once at tiny sizes (the smoke
test). This process computes with ``common.cpu_env``'s malloc settings, like every stage on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from benchmarks import (
    bench_allocator,
    bench_compile,
    bench_gpu,
    bench_pipeline,
    bench_probe,
    bench_step,
    bench_threads,
    bench_whitening,
    report,
)
from benchmarks.common import add_ratios, machine_info, set_threads
from common.cpu_env import tune_cpu_allocator

BENCHMARKS = ("whitening", "objective", "step", "probe", "pipeline", "compile", "allocator", "threads")
ON_REQUEST = ("gpu",)  # not in the default run: --gpu (or --only gpu)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of {','.join(BENCHMARKS + ON_REQUEST)} (default: all but gpu)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU-node check only: engine step (channels_last, torch.compile) and loader images/s")
    p.add_argument("--gpu-batch", type=int, default=None,
                   help="per-GPU batch of the --gpu check (default 64 on a GPU, 8 on the CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenCV compute threads (default 1: per-core numbers, stable on a shared machine)")
    p.add_argument("--images", type=int, default=64, help="JPEGs in the pipeline benchmark (default 64)")
    p.add_argument("--full", action="store_true", help="also the slowest shapes (batch whitening d=2048)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, no warm-up (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    p.add_argument("--name", default=None, help="file stem of the results (default: today's date, UTC)")
    args = p.parse_args(argv)
    if args.only is None:
        args.only = ",".join(ON_REQUEST if args.gpu else BENCHMARKS)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS + ON_REQUEST))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS + ON_REQUEST)}")
    if args.gpu_batch is not None and args.gpu_batch < 8:
        p.error("--gpu-batch must be >= 8 (INTL's beta rule needs a global batch of 8 or more)")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.images < 1:
        p.error("--repeats, --threads and --images must be >= 1, --warmup >= 0")
    args.only = only
    if args.quick:
        args.repeats, args.warmup = 1, 0
    return args


def run(args: argparse.Namespace, log=print) -> dict:
    set_threads(args.threads)
    tune_cpu_allocator("cuda" if torch.cuda.is_available() else "cpu")
    machine = machine_info()
    log(f"[bench] {machine['cpu']} ({machine['cpus_usable']} usable CPUs, load {machine['load_average_1m']}), "
        f"torch {machine['torch']}, {args.threads} thread(s); running {args.only}")
    rows, timings = [], {}
    common = dict(quick=args.quick, warmup=args.warmup, repeats=args.repeats, log=log)
    for name in args.only:
        t0 = time.perf_counter()
        if name == "whitening":
            rows += bench_whitening.run(full=args.full, **common)
        elif name == "objective":
            rows += bench_whitening.run_objective(**common)
        elif name == "step":
            rows += bench_step.run(**common)
        elif name == "probe":
            rows += bench_probe.run(**common)
        elif name == "pipeline":
            rows += bench_pipeline.run(num_images=args.images, **common)
        elif name == "compile":
            rows += bench_compile.run(**common)
        elif name == "allocator":
            rows += bench_allocator.run(**common)
        elif name == "threads":
            rows += bench_threads.run(**common)
        elif name == "gpu":
            rows += bench_gpu.run(batch=args.gpu_batch, **common)
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"[bench] {name} done in {timings[name]}s")
    add_ratios(rows)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "created_utc": stamp.isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "threads": args.threads, "quick": args.quick,
                     "images": args.images, "full": args.full, "gpu_batch": args.gpu_batch},
        "machine": machine,
        "seconds_per_benchmark": timings,
        "rows": [r.to_json() for r in rows],
    }
    stem = args.name or stamp.strftime("%Y-%m-%d")
    paths = report.write_all(result, rows, args.out, stem)
    log(report.markdown_table(rows))
    log("[bench] wrote " + ", ".join(str(p) for p in paths))
    result["paths"] = [str(p) for p in paths]
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print("[bench] interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
