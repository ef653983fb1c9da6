"""Data pipeline: images per second per core of the pretraining augmentation, from ImageNet-like JPEGs.

Baseline: the reference code's way (``benchmarks.baselines``: full-size PIL decode, torchvision v1 PIL
transforms, one Compose per view). Candidate: ``pretrain.augment.build_view_transform`` fed the way
``common.imagefolder.RobustImageFolder`` feeds it (an opened, not yet decoded file). Same files, same
process, one thread (per-core numbers), variants interleaved every 8 images. Cases: the paper's 2 views (Table 4) and
the 6-crop multi-crop (Table 5), at the paper's crop sizes; and the whole DataLoader (2 workers) of the
2-view case, reference set-up against ours.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from PIL import Image

from benchmarks.baselines import pil_loader, reference_view_pipeline
from benchmarks.common import Row, interleaved
from benchmarks.images import write_imagenet_like
from common.imagefolder import RobustImageFolder, dataloader_defaults
from pretrain.augment import build_view_transform

NAME = "pipeline"


def image_dir() -> Path:
    return Path(tempfile.gettempdir()) / "intl-bench-imagenet-like"


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
    return rows


def loader_case(paths, cases, warmup, repeats, workers, batch, log=print) -> list[Row]:
    """Whole DataLoader, ``workers`` worker processes: the reference set-up (torchvision ImageFolder,
    reference views, DataLoader defaults of the reference code) against ``RobustImageFolder`` +
    ``build_view_transform`` + ``common.imagefolder.dataloader_defaults`` (persistent workers, one thread per
    worker, prefetch 4). Throughput of the whole machine, not per core; one pass = one epoch."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    root = paths[0].parent / "as_imagefolder"
    (root / "class0").mkdir(parents=True, exist_ok=True)
    for p in paths:
        link = root / "class0" / p.name
        if not link.exists():
            try:
                link.symlink_to(p)
            except FileExistsError:  # another run made it meanwhile
                pass
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
