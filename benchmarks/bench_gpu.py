"""The GPU-node check (``make bench BENCH_ARGS="--gpu"``): does this node train fast, and does its loader keep up?

1. The engine's real step (``benchmarks.engine_step``: ``PretrainEngine`` of the ``imagenet_100ep`` preset,
   ResNet-50, projector 3 x 8192, the paper's two 224-px views, ``train.amp=bf16``) on random views already on
   the GPU, with ``train.channels_last`` off / on and with ``torch.compile`` of the network off / on: the four
   variants interleaved round by round after warm-up (compilation, cuDNN autotuning), images/s per GPU.
   The compiled variants are ``torch.compile(engine.model)``, what ``train.compile=true`` does in a one-process
   run; the check calls it itself so that its smoke test can choose a backend without code generation.
2. The loader: the engine's own DataLoader (``RobustImageFolder`` + ``pretrain.augment``, the same views,
   ``common.imagefolder.dataloader_defaults``) over ImageNet-like JPEGs with one worker per usable core of the
   node, images/s over whole epochs after the workers started.
3. The verdict: the loader's images/s against what the node's GPUs consume (the fastest variant's images/s per
   GPU x the GPUs), printed and written with the results.

Without CUDA it measures the CPU instead, at smaller sizes (ResNet-50 at 64 px, batch 8, fp32; inductor's C++
code generation takes many minutes on a small CPU), so that the check cannot rot; it says so in its output.
``--quick`` (the smoke test): ResNet-18 at 32 px, and ``torch.compile`` with the ``eager`` backend (TorchDynamo's
graph capture without code generation, seconds instead of minutes).
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import Row, interleaved
from benchmarks.engine_step import build_engine, random_views, step_timer

NAME = "gpu"
LOADER_IMAGES = 256


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def settings(cuda: bool, quick: bool, batch: int | None) -> dict:
    if cuda:
        return {"overrides": ["pretrain/preset=imagenet_100ep", "train.amp=bf16"], "batch": batch or 64,
                "image": 224, "model": "ResNet-50, projector 3x8192", "views": "2 x 224-px views", "amp": "bf16",
                "steps": 10}
    if quick:
        views = "[{size:32},{size:32,blur_prob:0.1,solarize_prob:0.2}]"
        return {"overrides": ["pretrain/preset=imagenet_100ep", "pretrain/model=resnet18", "model.projector=[64,64]",
                              f"++data.augment.views={views}", "train.amp=off"],
                "batch": batch or 8, "image": 32, "model": "ResNet-18, projector 2x64", "views": "2 x 32-px views",
                "amp": "fp32", "steps": 1, "loader_images": 16, "compile_backend": "eager"}
    views = "[{size:64},{size:64,blur_prob:0.1,solarize_prob:0.2}]"
    return {"overrides": ["pretrain/preset=imagenet_100ep", f"++data.augment.views={views}", "train.amp=off"],
            "batch": batch or 8, "image": 64, "model": "ResNet-50, projector 3x8192", "views": "2 x 64-px views",
            "amp": "fp32", "steps": 2}


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, log=print, batch: int | None = None) -> list[Row]:
    cuda = torch.cuda.is_available()
    s = settings(cuda, quick, batch)
    what = f"{s['model']}, {s['views']}, {s['amp']}"
    gpus = torch.cuda.device_count() if cuda else 0
    device = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA: the CPU was measured, not a GPU)"
    cores = usable_cores()
    log(f"[gpu] {device}: {what}, batch {s['batch']} per GPU; {cores} usable cores"
        + ("" if cuda else "; no CUDA on this machine, so this measures the CPU at small sizes"))
    case = f"{device}: engine step, {what}, batch {s['batch']}"
    common = [*s["overrides"], f"optim.batch_size={s['batch']}"]
    workers = cores
    images = s.get("loader_images", LOADER_IMAGES)
    engines = {cl: build_engine([*common, f"train.channels_last={str(cl).lower()}", f"data.workers={workers}"],
                                images=images) for cl in (False, True)}
    steps = s["steps"]
    fns, notes = {}, []
    for cl, engine in engines.items():
        views = random_views(engine, s["image"])
        label = "channels_last" if cl else "contiguous"
        eager = step_timer(engine, views)
        fns[f"eager, {label}"] = lambda f=eager: [f() for _ in range(steps)]
        try:
            backend = s.get("compile_backend", "inductor")
            compiled = step_timer(engine, views, torch.compile(engine.model, backend=backend))
            name = "torch.compile" + ("" if backend == "inductor" else f" (backend {backend}: graph capture only)")
        except Exception as e:  # noqa: BLE001 - a platform without a compiler: say so, measure the rest
            notes.append(f"torch.compile unavailable here ({type(e).__name__}: {e})")
            continue
        fns[f"{name}, {label}"] = lambda f=compiled: [f() for _ in range(steps)]
    log(f"[gpu] step: {len(fns)} variants x {repeats} repeats of {steps} step(s), after {max(warmup, 2)} warm-up "
        "round(s) (the first compiles)")
    try:
        times = interleaved(fns, max(warmup, 2), repeats, progress=lambda m: log(f"[gpu] step: {m}"))
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"[gpu] out of GPU memory at batch {s['batch']}; try BENCH_ARGS=\"--gpu --gpu-batch "
                         f"{max(s['batch'] // 2, 1)}\"") from None
    base = next(iter(fns))
    rows = [Row(NAME, case, name, "img/s per GPU", [steps * s["batch"] / t for t in ts],
                baseline=None if name == base else base, higher_is_better=True,
                extra={"device": device, "cuda": cuda, "batch": s["batch"]}) for name, ts in times.items()]

    loader = engines[False].loader  # the engine's own DataLoader: same views, workers, defaults
    for engine in engines.values():
        engine.model = engine.net = engine.optimizer = None  # free the GPU/host memory before the loader runs
    if cuda:
        torch.cuda.empty_cache()
    epoch_images = (images // s["batch"]) * s["batch"]

    def epoch():
        n = 0
        for views, _ in loader:
            n += views[0].shape[0]
        return n
    lcase = f"loader: {s['views']}, the engine's DataLoader"
    log(f"[gpu] {lcase}, {workers} workers (the node's usable cores), "
        f"{repeats} epochs of {epoch_images} images after one warm-up epoch")
    ltimes = interleaved({"loader": epoch}, 1, repeats, progress=lambda m: log(f"[gpu] loader: {m}"))["loader"]
    lrow = Row(NAME, lcase, f"DataLoader, {workers} workers", "img/s (whole loader)",
               [epoch_images / t for t in ltimes], higher_is_better=True, extra={"workers": workers})
    rows.append(lrow)

    best = max(rows[:-1], key=lambda r: r.median)
    consumers = max(gpus, 1)
    need = best.median * consumers
    verdict = (f"the loader ({lrow.median:.0f} img/s with {workers} workers) "
               + (f"keeps up with the {'GPUs' if cuda else 'CPU step'}: {lrow.median / need:.2f}x what "
                  if lrow.median >= need else
                  f"does NOT keep up with the {'GPUs' if cuda else 'CPU step'}: it makes {lrow.median / need:.2f}x "
                  f"(the {'GPUs' if cuda else 'CPU'} would wait {100 * (1 - lrow.median / need):.0f}% of the time) of "
                  "what ")
               + (f"{consumers} GPU(s) x {best.median:.0f} img/s ({best.variant}) consume"
                  if cuda else f"the CPU step consumes ({best.median:.1f} img/s, {best.variant}; loader and step "
                               "share the same cores here, so this is a smoke test, not a verdict on a GPU node)"))
    if not lrow.median >= need and cuda:
        verdict += "; give each GPU more cores (submit --cpus-per-gpu, data.workers) or fewer/smaller views"
    notes.append(verdict)
    lrow.extra["notes"] = notes
    log("[gpu] " + "; ".join(notes))
    return rows
