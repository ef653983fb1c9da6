"""The embedded datasets: generated deterministically from a seed, no downloads.

1. ``classification/``: an ImageFolder tree (``train/<class>/*.jpg``, ``val/<class>/*.jpg``) of ten
   shape classes drawn at random positions, sizes, rotations and colours on textured backgrounds.
   The class is the shape, so colour jitter or cropping do not give it away: a CNN must learn shape.
2. ``coco/``: a COCO-json instance-segmentation set (``instances_train.json``, ``instances_val.json``,
   images under ``train/`` and ``val/``) with three categories, one to three non-overlapping objects per
   image, polygon masks, and boxes / areas computed from the polygons.

``python -m common.synthetic --out data/synthetic`` writes both; a ``manifest.json`` records the
parameters, and running the command again with the same parameters does nothing.
Every image is drawn from its own seed ``(seed, set, split, index)``, so the same seed gives
byte-identical files whatever the other sizes are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = (
    "circle", "square", "triangle", "cross", "ring",
    "star", "hexagon", "diamond", "stripes", "checker",
)
DETECTION_CATEGORIES = ("circle", "square", "triangle")
JPEG_QUALITY = 92


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    cls_size: int = 64
    cls_train_per_class: int = 100
    cls_val_per_class: int = 25
    det_size: int = 128
    det_train_images: int = 96
    det_val_images: int = 24
    det_max_objects: int = 3


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _distinct_colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A foreground and a background colour that differ clearly in brightness or hue."""
    while True:
        fg, bg = _colour(rng), _colour(rng)
        if sum(abs(a - b) for a, b in zip(fg, bg)) > 180:
            return fg, bg


def _background(rng: np.random.Generator, size: int, colour) -> Image.Image:
    """A flat colour with smooth low-frequency noise, so backgrounds are not trivially uniform."""
    coarse = rng.normal(0.0, 18.0, size=(4, 4, 3))
    up = np.stack([
        np.array(Image.fromarray(coarse[..., c].astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
        for c in range(3)
    ], axis=-1)
    arr = np.clip(np.asarray(colour, np.float32) + up + rng.normal(0, 4.0, size=(size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def regular_polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + radius * math.cos(angle + 2 * math.pi * k / sides),
         cy + radius * math.sin(angle + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The outline of a solid shape as one polygon (used for drawing and for the COCO masks)."""
    if name == "circle":
        return regular_polygon(cx, cy, r, 32, angle)
    if name == "square":
        return regular_polygon(cx, cy, r, 4, angle + math.pi / 4)
    if name == "triangle":
        return regular_polygon(cx, cy, r, 3, angle - math.pi / 2)
    if name == "hexagon":
        return regular_polygon(cx, cy, r, 6, angle)
    if name == "diamond":
        pts = regular_polygon(0, 0, r, 4, angle)
        return [(cx + x * (1.0 if k % 2 == 0 else 0.55), cy + y * (1.0 if k % 2 == 0 else 0.55))
                for k, (x, y) in enumerate(pts)]
    if name == "star":
        return [
            (cx + rad * math.cos(angle + math.pi * k / 5), cy + rad * math.sin(angle + math.pi * k / 5))
            for k, rad in enumerate([r if k % 2 == 0 else 0.42 * r for k in range(10)])
        ]
    if name == "cross":
        w = 0.33 * r
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
                (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(f"no polygon for shape {name!r}")


def _draw_class_image(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    fg, bg = _distinct_colours(rng)
    img = _background(rng, size, bg)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = (rng.uniform(r, size - r) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    if name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ri = r * rng.uniform(0.45, 0.6)
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif name in ("stripes", "checker"):
        period = max(4, int(size * rng.uniform(0.10, 0.18)))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        c, s = math.cos(angle), math.sin(angle)
        u, v = (xx * c + yy * s) / period, (-xx * s + yy * c) / period
        on = (np.floor(u) % 2 == 0) if name == "stripes" else ((np.floor(u) + np.floor(v)) % 2 == 0)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (1.25 * r) ** 2
        arr = np.array(img)
        arr[on & inside] = fg
        img = Image.fromarray(arr, "RGB")
    else:
        draw.polygon(shape_polygon(name, cx, cy, r, angle), fill=fg)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 0.8))))
    return img


def _save_jpeg(img: Image.Image, path: Path) -> None:
    img.save(path, format="JPEG", quality=JPEG_QUALITY)


def generate_classification(root: Path, spec: SyntheticSpec) -> dict:
    counts = {}
    for split_id, (split, per_class) in enumerate((("train", spec.cls_train_per_class),
                                                   ("val", spec.cls_val_per_class))):
        for c, name in enumerate(CLASS_NAMES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = _draw_class_image(name, spec.cls_size, _rng(spec.seed, 1, split_id, c, i))
                _save_jpeg(img, d / f"{name}_{i:05d}.jpg")
        counts[split] = per_class * len(CLASS_NAMES)
    return counts


def _place_objects(rng: np.random.Generator, size: int, n: int) -> list[tuple[float, float, float]]:
    """Up to n (cx, cy, r) with non-overlapping bounding circles (so no mask is occluded)."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(50 * n):
        if len(placed) == n:
            break
        r = size * rng.uniform(0.12, 0.24)
        cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
        if all(math.hypot(cx - x, cy - y) > r + rr + 3 for x, y, rr in placed):
            placed.append((cx, cy, r))
    return placed


def polygon_area_bbox(poly: list[float], height: int, width: int) -> tuple[float, list[float]]:
    """COCO area (pixels of the rasterised polygon, as pycocotools computes it) and xywh bbox of the polygon."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
    xs, ys = poly[0::2], poly[1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return float(mask_utils.area(rle)), [round(v, 2) for v in bbox]


def generate_coco(root: Path, spec: SyntheticSpec) -> dict:
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(DETECTION_CATEGORIES)]
    counts = {}
    for split_id, (split, n_images) in enumerate((("train", spec.det_train_images), ("val", spec.det_val_images))):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n_images):
            rng = _rng(spec.seed, 2, split_id, i)
            _, bg = _distinct_colours(rng)
            img = _background(rng, spec.det_size, bg)
            draw = ImageDraw.Draw(img)
            n = int(rng.integers(1, spec.det_max_objects + 1))
            file_name = f"{split}/{i:06d}.jpg"
            for cx, cy, r in _place_objects(rng, spec.det_size, n):
                cat = int(rng.integers(0, len(DETECTION_CATEGORIES)))
                while True:
                    fg = _colour(rng)
                    if sum(abs(a - b) for a, b in zip(fg, bg)) > 180:
                        break
                pts = shape_polygon(DETECTION_CATEGORIES[cat], cx, cy, r, rng.uniform(0, 2 * math.pi))
                pts = [(round(x, 2), round(y, 2)) for x, y in pts]
                draw.polygon(pts, fill=fg)
                poly = [v for p in pts for v in p]
                area, bbox = polygon_area_bbox(poly, spec.det_size, spec.det_size)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat + 1,
                    "segmentation": [poly], "area": area, "bbox": bbox, "iscrowd": 0,
                })
            _save_jpeg(img, root / file_name)
            images.append({"id": i + 1, "file_name": file_name, "height": spec.det_size, "width": spec.det_size})
        data = {
            "info": {"description": "INTL pipeline synthetic shapes", "version": "1.0", "seed": spec.seed},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories,
        }
        (root / f"instances_{split}.json").write_text(json.dumps(data))
        counts[split] = {"images": len(images), "annotations": len(annotations)}
    return counts


def generate(out: Path, spec: SyntheticSpec, force: bool = False) -> dict:
    """Writes both sets under ``out`` (atomically: into a temporary folder, then renamed)."""
    out = Path(out)
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec") == asdict(spec):
            return manifest
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    counts = {
        "classification": generate_classification(tmp / "classification", spec),
        "coco": generate_coco(tmp / "coco", spec),
    }
    manifest = {"spec": asdict(spec), "counts": counts, "classes": list(CLASS_NAMES),
                "detection_categories": list(DETECTION_CATEGORIES), "seconds": round(time.time() - t0, 2)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/synthetic", help="output folder (default: %(default)s)")
    defaults = SyntheticSpec()
    for field, value in asdict(defaults).items():
        p.add_argument("--" + field.replace("_", "-"), type=int, default=value, help=f"default: {value}")
    p.add_argument("--force", action="store_true", help="regenerate even if the manifest matches")
    args = p.parse_args(argv)
    spec = SyntheticSpec(**{f: getattr(args, f) for f in asdict(defaults)})
    for field, value in asdict(spec).items():
        if field != "seed" and value < 1:
            p.error(f"--{field.replace('_', '-')} must be >= 1, got {value}")
    manifest = generate(Path(args.out), spec, force=args.force)
    c = manifest["counts"]
    print(
        f"synthetic data in {args.out}: classification {c['classification']['train']} train / "
        f"{c['classification']['val']} val images, {len(CLASS_NAMES)} classes, {spec.cls_size}px; "
        f"coco {c['coco']['train']['images']} train / {c['coco']['val']['images']} val images "
        f"({c['coco']['train']['annotations']} / {c['coco']['val']['annotations']} objects), {spec.det_size}px"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
