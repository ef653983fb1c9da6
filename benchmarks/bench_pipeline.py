"""Data pipeline: images per second per core of the pretraining augmentation, from ImageNet-like JPEGs.

Baseline: the reference code's way (``benchmarks.baselines``: full-size PIL decode, torchvision v1 PIL
transforms, one Compose per view). Candidate: ``pretrain.augment.build_view_transform`` fed the way
``common.imagefolder.RobustImageFolder`` feeds it (an opened, not yet decoded file). Same files, same
process, one thread (per-core numbers), variants interleaved every 8 images. Cases: the paper's 2 views (Table 4) and
the 6-crop multi-crop (Table 5), at the paper's crop sizes; and the whole DataLoader (2 workers) of the
2-view case, reference set-up against ours.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from benchmarks.baselines import pil_loader, reference_view_pipeline
from benchmarks.common import Row, interleaved
from benchmarks.images import write_imagenet_like
from common.imagefolder import RobustImageFolder, dataloader_defaults
from pretrain.augment import OP_NAMES, build_view_transform

NAME = "pipeline"
PROFILE = "pipeline-profile"  # rows of the per-op profile (report.py prints them as their own table)
COLLATE_BATCH = 16


def image_dir() -> Path:
    return Path(tempfile.gettempdir()) / "intl-bench-imagenet-like"


def bench_imagefolder(n: int, paths: list[Path] | None = None) -> Path:
    """An ImageFolder root (one class, symlinks) over ``paths``, by default ``n`` ImageNet-like JPEGs."""
    paths = paths if paths is not None else write_imagenet_like(image_dir() / "full", n)
    root = paths[0].parent / f"as_imagefolder_{len(paths)}"
    (root / "class0").mkdir(parents=True, exist_ok=True)
    for p in paths:
        link = root / "class0" / p.name
        if not link.exists():
            try:
                link.symlink_to(p)
            except FileExistsError:  # another run made it meanwhile
                pass
    return root


def interleaved_chunks(fns: dict, paths: list, warmup: int, repeats: int, chunk: int = 8, log=None) -> dict:
    """Seconds per pass over ``paths`` for each variant, alternating variants every ``chunk`` images so
    that load from other processes (a shared machine) hits every variant alike, also within a pass."""
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    for _ in range(warmup):
        for fn in fns.values():
            for p in paths:
                fn(p)
    times = {k: [] for k in fns}
    t_start = time.perf_counter()
    for r in range(repeats):
        total = dict.fromkeys(fns, 0.0)
        for part in chunks:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for p in part:
                    fn(p)
                total[name] += time.perf_counter() - t0
        for k, v in total.items():
            times[k].append(v)
        if log is not None:
            done = time.perf_counter() - t_start
            log(f"repeat {r + 1}/{repeats} ({done:.1f}s, ETA {done / (r + 1) * (repeats - r - 1):.0f}s)")
    return times


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, num_images: int = 64, log=print) -> list[Row]:
    if quick:
        num_images, sizes = 4, ((120, 90), (90, 120))
        cases = {"2-view": {"views": [{"size": 32}, {"size": 32, "blur_prob": 0.1, "solarize_prob": 0.2}]},
                 "6-crop": {"preset": "synthetic_multicrop"}}
    else:
        sizes = None
        cases = {"2-view 224": {"preset": "imagenet"}, "6-crop 2x224+192+160+128+96": {"preset": "imagenet_multicrop"}}
    out = image_dir() / ("quick" if quick else "full")
    kw = {"sizes": sizes} if sizes else {}
    paths = write_imagenet_like(out, num_images, **kw)
    avg_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    log(f"[pipeline] {len(paths)} JPEGs in {out} (avg {avg_kb:.0f} KB)")
    rows: list[Row] = []
    for case, cfg in cases.items():
        ref = reference_view_pipeline(cfg)
        fast = build_view_transform(cfg)
        fns = {
            "reference (PIL decode + torchvision v1 PIL ops)": lambda p, ref=ref: ref(pil_loader(p)),
            "pretrain.augment (lazy/draft decode, v2 uint8 resize, OpenCV colour)":
                lambda p, fast=fast: fast(Image.open(p)),
        }
        log(f"[pipeline] {case}: {len(fns)} variants x {repeats} repeats of {len(paths)} images")
        times = interleaved_chunks(fns, paths, warmup, repeats,
                                   log=lambda m, case=case: log(f"[pipeline] {case}: {m}"))
        base = next(iter(fns))
        for name, ts in times.items():
            rows.append(Row(NAME, case, name, "img/s/core", [len(paths) / t for t in ts],
                            baseline=None if name == base else base, higher_is_better=True,
                            extra={"images": len(paths), "avg_jpeg_kb": round(avg_kb, 1), "views": len(fast.sizes)}))
    rows += loader_case(paths, cases, warmup, repeats, workers=2, batch=2 if quick else 16, log=log)
    case, cfg = next(iter(cases.items()))
    rows += op_profile(paths, case, cfg, repeats, log=log)
    return rows


def _reference_op_name(t) -> str:
    inner = t.transforms[0] if type(t).__name__ == "RandomApply" else t
    return type(inner).__name__.lstrip("_")


def op_profile(paths, case: str, cfg, repeats: int, log=print) -> list[Row]:
    """Where the time goes, per image (ms): ``ViewTransform.profile`` times each operation of ours
    (``pretrain.augment.OP_NAMES``), the reference's Compose is timed transform by transform, and both are
    followed by the DataLoader's ``default_collate`` of batches of ``COLLATE_BATCH``. One pass over the images
    per repeat, the two pipelines alternating image by image; the median over repeats of each op's total."""
    from torch.utils.data import default_collate

    ref, fast = reference_view_pipeline(cfg), build_view_transform(cfg)
    ours: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    for _ in range(repeats):
        t_ours: dict[str, float] = dict.fromkeys(OP_NAMES, 0.0)
        t_ref: dict[str, float] = {}
        out_ours, out_ref = [], []
        for p in paths:
            out_ours.append((fast.profile(Image.open(p), t_ours), 0))
            t0 = time.perf_counter()
            img = pil_loader(p)
            t_ref["decode"] = t_ref.get("decode", 0.0) + time.perf_counter() - t0
            views = []
            for compose in ref.transforms:
                x = img
                for t in compose.transforms:
                    t0 = time.perf_counter()
                    x = t(x)
                    name = _reference_op_name(t)
                    t_ref[name] = t_ref.get(name, 0.0) + time.perf_counter() - t0
                views.append(x)
            out_ref.append((views, 0))
        for out, timings in ((out_ours, t_ours), (out_ref, t_ref)):
            t0 = time.perf_counter()
            for i in range(0, len(out) - COLLATE_BATCH + 1, COLLATE_BATCH):
                default_collate(out[i:i + COLLATE_BATCH])
            batches = max(len(out) // COLLATE_BATCH, 1)
            timings["collate"] = (time.perf_counter() - t0) * len(out) / (batches * COLLATE_BATCH)
        for acc, timings in ((ours, t_ours), (theirs, t_ref)):
            for k, v in timings.items():
                acc.setdefault(k, []).append(1000 * v / len(paths))
    rows = []
    for variant, acc in (("pretrain.augment", ours), ("reference", theirs)):
        total = sum(statistics.median(v) for v in acc.values())
        for op, ms in acc.items():
            rows.append(Row(PROFILE, case, f"{variant}: {op}", "ms/img", ms,
                            extra={"share_pct": round(100 * statistics.median(ms) / total, 1)}))
        log(f"[pipeline] profile of {variant} ({case}): " + ", ".join(
            f"{op} {statistics.median(ms):.2f} ms" for op, ms in acc.items()) + f"; total {total:.2f} ms/img")
    return rows


def loader_case(paths, cases, warmup, repeats, workers, batch, log=print) -> list[Row]:
    """Whole DataLoader, ``workers`` worker processes: the reference set-up (torchvision ImageFolder,
    reference views, DataLoader defaults of the reference code) against ``RobustImageFolder`` +
    ``build_view_transform`` + ``common.imagefolder.dataloader_defaults`` (persistent workers, one thread per
    worker, prefetch 4). Throughput of the whole machine, not per core; one pass = one epoch."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    root = bench_imagefolder(len(paths), paths)
    case, cfg = next(iter(cases.items()))
    ref_loader = DataLoader(ImageFolder(str(root), transform=reference_view_pipeline(cfg)), batch_size=batch,
                            shuffle=False, drop_last=True, num_workers=workers, pin_memory=torch.cuda.is_available())
    fast_loader = DataLoader(RobustImageFolder(root, transform=build_view_transform(cfg)), batch_size=batch,
                             shuffle=False, drop_last=True, **dataloader_defaults(workers))

    def epoch(loader):
        def run():
            n = 0
            for views, _ in loader:
                n += views[0].shape[0]
            return n
        return run

    fns = {"reference ImageFolder + DataLoader": epoch(ref_loader),
           "RobustImageFolder + pretrain.augment + dataloader_defaults": epoch(fast_loader)}
    lcase = f"{case}, DataLoader {workers} workers batch {batch}"
    log(f"[pipeline] {lcase}: {repeats} epochs of {len(paths)} images per variant")
    times = interleaved(fns, warmup, repeats, progress=lambda m: log(f"[pipeline] {lcase}: {m}"))
    images = (len(paths) // batch) * batch
    base = next(iter(fns))
    return [Row(NAME, lcase, name, "img/s (whole loader)", [images / t for t in ts],
                baseline=None if name == base else base, higher_is_better=True, extra={"workers": workers})
            for name, ts in times.items()]
