"""Backbone features of a dataset, written to disk: ``python -m transfer.embed weights=... data.root=... [split=val]``
(``submit embed``), so that k-NN with several k, retrieval or a user's own probes reuse them.

Every process extracts its shard (``common.features.extract_features``: the evaluation transform, backbone in
eval mode, features gathered in dataset order); rank 0 writes into the run folder, each file atomically:

- ``features_<split>.npy``: float32, one row per image (not normalised), ``labels_<split>.npy``: int64 class
  indices, ``files_<split>.txt``: the image of each row (its path; STL-10: ``stl10/<split>/<index>``); or with
  ``format=torch`` one ``features_<split>.pt`` holding ``{"features", "labels", "files"}``;
- ``embedding.json``: the splits (rows, feature dimension, classes), the source checkpoint (path, sha256, kind,
  encoder, step, finished), the data and transform, the unreadable images left out; then ``results.json`` and
  ``COMPLETE``.

Unreadable images are left out (no row), counted over all ranks and listed in ``unreadable_images.txt``.
``read_embedding(folder, split)`` reads either format back (``transfer.knn`` with ``knn.features=<folder>``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from common.atomic import atomic_path, atomic_torch_save, atomic_write_text, write_json
from common.checkpoint import CheckpointError
from common.distributed import barrier
from common.features import EXCLUDED, extract_features
from common.runlog import mark_complete, save_config, write_results
from common.stage import begin, hydra_main
from transfer import classification as C

STAGE = "embed"
META = "embedding.json"


def validate_config(cfg: Any, world_size: int = 1, check_paths: bool = True) -> DictConfig:
    return C.validate_eval_config(cfg, STAGE, world_size=world_size, check_paths=check_paths)


def sample_names(dataset, split: str) -> list[str]:
    """The image of each row: its file path (ImageFolder), or ``stl10/<split>/<index>`` (STL-10's binary files)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [str(p) for p, _ in samples]
    return [f"stl10/{getattr(dataset, 'split', split)}/{i}" for i in range(len(dataset))]


def write_split(run_dir: Path, split: str, feats: np.ndarray, labels: np.ndarray, files: list[str], fmt: str) -> list:
    """The split's files, each written atomically; returns their names."""
    if fmt == "torch":
        name = f"features_{split}.pt"
        atomic_torch_save({"features": torch.from_numpy(feats), "labels": torch.from_numpy(labels), "files": files},
                          run_dir / name)
        return [name]
    names = [f"features_{split}.npy", f"labels_{split}.npy", f"files_{split}.txt"]
    for name, array in zip(names[:2], (feats, labels)):
        with atomic_path(run_dir / name) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write_text(run_dir / names[2], "".join(f"{n}\n" for n in files))
    return names


def read_embedding(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(features, labels, files, embedding.json) of one split of a ``transfer.embed`` run folder."""
    folder = Path(folder)
    fix = f"fix: run `python -m transfer.embed ... run_dir={folder} split=all` first (k-NN needs train and val)"
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder} holds no readable {META} ({type(e).__name__}); {fix}") from None
    entry = meta.get("splits", {}).get(split)
    if entry is None:
        raise CheckpointError(f"{folder} has no '{split}' features (splits: {sorted(meta.get('splits', {}))}); {fix}")
    try:
        if meta.get("format") == "torch":
            saved = torch.load(folder / f"features_{split}.pt", map_location="cpu", weights_only=True)
            feats, labels, files = saved["features"], saved["labels"], list(saved["files"])
        else:
            feats = torch.from_numpy(np.load(folder / f"features_{split}.npy"))
            labels = torch.from_numpy(np.load(folder / f"labels_{split}.npy"))
            files = (folder / f"files_{split}.txt").read_text().splitlines()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: the '{split}' features cannot be read ({type(e).__name__}: {e}); {fix}") \
            from None
    if not (feats.shape[0] == labels.shape[0] == len(files) == entry["n"]):
        raise CheckpointError(f"{folder}: the '{split}' files disagree ({feats.shape[0]} feature rows, "
                              f"{labels.shape[0]} labels, {len(files)} names, {entry['n']} in {META}); {fix}")
    return feats, labels, files, meta


def run(cfg: DictConfig) -> dict | None:
    start = begin(cfg, validate_config, C.log, check_done=C.check_previous)
    if start.done is not None:
        return start.finished_result()
    cfg, info, run_dir = start.cfg, start.info, start.run_dir
    if info.is_main:
        save_config(run_dir, cfg)
    transform = C.eval_transform(cfg.data)
    loaded = C.build_model(cfg, num_classes=None)
    backbone = loaded.model.to(info.device)
    splits = ("train", "val") if cfg.split == "all" else (cfg.split,)
    meta: dict = {"format": cfg.format, "arch": loaded.arch, "small_stem": loaded.small_stem,
                  "feature_dim": loaded.feature_dim, "encoder": cfg.encoder, "source_checkpoint": cfg.weights,
                  "source": loaded.identity, "weights_kind": loaded.kind, "data": {
                      "kind": cfg.data.kind, "root": cfg.data.root, "classes": cfg.data.classes,
                      "resize": cfg.data.val_resize, "crop": cfg.data.val_crop, "mean": list(cfg.data.mean),
                      "std": list(cfg.data.std)}, "splits": {}, "world_size": info.world_size}
    datasets, t0 = {}, time.time()
    for split in splits:
        ds = datasets[split] = C.image_set(cfg.data, split, transform, EXCLUDED)
        C.log.info("embedding %s: %d %s images with %s (%s, %s, %d features)", split, len(ds), cfg.data.kind,
                   loaded.source, loaded.arch, loaded.kind, loaded.feature_dim)
        feats, labels = extract_features(backbone, C.eval_loader(ds, cfg.batch_size, cfg.data.workers), info.device,
                                         progress=info.is_main)
        if info.is_main:
            keep = (labels != EXCLUDED).cpu()
            names = [n for n, k in zip(sample_names(ds, split), keep.tolist()) if k]
            f_np = feats.cpu()[keep].numpy().astype(np.float32)
            y_np = labels.cpu()[keep].numpy().astype(np.int64)
            written = write_split(run_dir, split, f_np, y_np, names, cfg.format)
            meta["splits"][split] = {"n": int(f_np.shape[0]), "dim": int(f_np.shape[1]), "files": written,
                                     "classes": list(getattr(ds, "classes", []))}
            write_json(run_dir / META, meta)  # after each split: a later failure keeps what was written
    unreadable = C.unreadable_images(run_dir, info, **datasets)
    results = None
    if info.is_main:
        meta["unreadable_images"] = unreadable
        write_json(run_dir / META, meta)
        results = write_results(run_dir, {"stage": STAGE, "embedding": META, "splits": meta["splits"],
                                          "source_checkpoint": cfg.weights, "source": loaded.identity,
                                          "encoder": cfg.encoder, "weights_kind": loaded.kind, "arch": loaded.arch,
                                          "feature_dim": loaded.feature_dim, "world_size": info.world_size,
                                          "unreadable_images": unreadable, "seconds": round(time.time() - t0, 1),
                                          "config": C.to_plain(cfg)})
        mark_complete(run_dir, {"splits": {s: v["n"] for s, v in meta["splits"].items()}})
        C.log.info("features written to %s: %s", run_dir,
                   ", ".join(f"{s} {v['n']} x {v['dim']}" for s, v in meta["splits"].items()))
    barrier()
    return results


if __name__ == "__main__":
    hydra_main(STAGE, run)
