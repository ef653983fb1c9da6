"""k-NN evaluation on frozen backbone features (no training).

Two variants, as in the paper's tables and the usual SSL protocol:
- plain k-NN (k=5): majority vote of the k nearest training images (cosine similarity on
  L2-normalised features); ties are broken by the summed similarity of the tied classes.
- weighted k-NN (k=20): the InstDisc / DINO vote, each neighbour weighing exp(sim / T), T=0.07.

The library pieces live in ``common.features`` (``extract_features``) and ``common.knn`` (``knn_accuracy``),
shared with the pretraining engine's periodic k-NN monitor (``pretrain.monitor``). The stage
``run(cfg)`` / ``python -m transfer.knn key=value ...`` evaluates a checkpoint on a labelled set, or reads
the features a ``transfer.embed`` run wrote (``knn.features=<its run folder>``: no backbone, no image read).
The weighted vote is also reported for every k of ``knn.weighted_ks`` (10, 20, 100, 200, as DINO's
``eval_knn.py``), from one nearest-neighbour search (``common.knn.knn_accuracies``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.features import extract_features, readable
from common.knn import knn_accuracies, knn_accuracy
from common.runlog import MetricsLogger, save_config
from common.stage import begin, hydra_main
from transfer import classification as C
from transfer.embed import META, read_embedding

# ------------------------------------------------------------------------------------------ the stage
STAGE = "knn"


def validate_config(cfg, world_size: int = 1, check_paths: bool = True):
    return C.validate_eval_config(cfg, STAGE, world_size=world_size, check_paths=check_paths)


def _from_embedding(cfg, run_dir: Path):
    """Features, labels, classes and the source of a ``transfer.embed`` run folder (``knn.features``)."""
    folder = Path(cfg.knn.features)
    tr_f, tr_y, _, meta = read_embedding(folder, "train")
    va_f, va_y, _, _ = read_embedding(folder, "val")
    classes = meta["splits"]["train"].get("classes") or []
    if classes != (meta["splits"]["val"].get("classes") or []):
        raise C.EvalConfigError(f"{folder}: its train and val features have different classes; fix: embed both "
                                "splits of one dataset (split=all)")
    loaded = C.LoadedBackbone(model=None, arch=meta["arch"], small_stem=meta["small_stem"],
                              feature_dim=meta["feature_dim"], source=f"{folder} ({meta['source_checkpoint']})",
                              kind=meta["weights_kind"], identity={**meta["source"], "features": str(folder)})
    return (tr_f, tr_y), (va_f, va_y), len(classes) or None, loaded, meta.get("unreadable_images", {})


def check_previous(cfg, previous: dict, run_dir: Path) -> None:
    """``common.stage.begin``'s check of a complete run: the same weights (or the same embedding's) and config."""
    if cfg.knn.features is None:
        return C.check_previous(cfg, previous, run_dir)
    sha = json.loads((Path(cfg.knn.features) / META).read_text())["source"]["sha256"]
    C.check_same_run(previous, cfg, sha, run_dir / "results.json")


def run(cfg) -> dict | None:
    """k-NN evaluation of ``cfg.weights`` (or random init) on ``cfg.data``: features of the training and
    validation images (evaluation transform), or those a ``transfer.embed`` run wrote (``knn.features``), then
    k=``knn.k`` plain and k=``knn.weighted_k`` weighted votes, and the weighted votes of every k in
    ``knn.weighted_ks`` from the same neighbours (one pass). top1/top5 in results.json are the plain k-NN's (the
    paper's tables); the weighted ones are under ``weighted`` and ``weighted_by_k``."""
    start = begin(cfg, validate_config, C.log, check_done=check_previous)
    if start.done is not None:
        return start.finished_result()
    cfg, info, run_dir = start.cfg, start.info, start.run_dir
    if info.is_main:
        save_config(run_dir, cfg)
    t0 = time.time()
    if cfg.knn.features is not None:
        (tr_f, tr_y), (va_f, va_y), n_cls, loaded, unreadable = _from_embedding(cfg, run_dir)
        C.log.info("k-NN evaluation of the features in %s (%s, %s, feature dim %d): %d train / %d val rows",
                   cfg.knn.features, loaded.arch, loaded.kind, loaded.feature_dim, tr_f.shape[0], va_f.shape[0])
    else:
        transform = C.eval_transform(cfg.data)
        train_ds, val_ds = C.labelled_sets(cfg.data, transform, transform, exclude_bad_train=True)
        loaded = C.build_model(cfg, num_classes=None)
        backbone = loaded.model.to(info.device)
        n_cls = len(train_ds.classes)
        C.log.info("k-NN evaluation of %s (%s, %s, feature dim %d): %d train / %d val images, %d classes",
                   loaded.source, loaded.arch, loaded.kind, loaded.feature_dim, len(train_ds), len(val_ds), n_cls)
        tr_f, tr_y = extract_features(backbone, C.eval_loader(train_ds, cfg.knn.batch_size, cfg.data.workers),
                                      info.device, progress=info.is_main)
        va_f, va_y = extract_features(backbone, C.eval_loader(val_ds, cfg.knn.batch_size, cfg.data.workers),
                                      info.device, progress=info.is_main)
        unreadable = C.unreadable_images(run_dir, info, train=train_ds, val=val_ds)
        (tr_f, tr_y), (va_f, va_y) = (readable(tr_f, tr_y), readable(va_f, va_y))
    if tr_f.shape[1] != loaded.feature_dim:
        raise RuntimeError(f"the backbone gave {tr_f.shape[1]} features, "
                           f"expected {loaded.feature_dim} for {loaded.arch}")
    results = None
    if info.is_main:
        plain = knn_accuracy(tr_f, tr_y, va_f, va_y, k=cfg.knn.k, weighted=False, num_classes=n_cls)
        ks = ([cfg.knn.weighted_k] if cfg.knn.weighted_k else []) + [k for k in cfg.knn.weighted_ks]
        votes = knn_accuracies(tr_f, tr_y, va_f, va_y, ks, weighted=True, temperature=cfg.knn.temperature,
                               num_classes=n_cls) if ks else []
        weighted = votes[0] if cfg.knn.weighted_k else None
        # keyed by the k asked for; k_used is smaller when the training set has fewer images
        by_k = {str(k): {"top1": v["top1"], "top5": v["top5"], "k_used": v["k"]}
                for k, v in zip(cfg.knn.weighted_ks, votes[1 if weighted else 0:])}
        logger = MetricsLogger(run_dir, enabled=True)
        logger.log(0, prefix=f"knn{plain['k']}/", top1=plain["top1"], top5=plain["top5"])
        if weighted:
            logger.log(0, prefix=f"knn{weighted['k']}_weighted/", top1=weighted["top1"], top5=weighted["top5"])
        for k, v in by_k.items():
            logger.log(0, prefix=f"knn{k}_weighted/", top1=v["top1"], top5=v["top5"])
        logger.close()
        C.log.info("k-NN (k=%d): top-1 %.2f top-5 %.2f%s%s  [%.0fs]", plain["k"], plain["top1"], plain["top5"],
                   f"; weighted k-NN (k={weighted['k']}, T={cfg.knn.temperature}): top-1 {weighted['top1']:.2f} "
                   f"top-5 {weighted['top5']:.2f}" if weighted else "",
                   "; weighted top-1 by k: " + ", ".join(f"k={k} {v['top1']:.2f}" for k, v in by_k.items())
                   if by_k else "", time.time() - t0)
        results = C.results_record(
            STAGE, cfg, loaded, info, top1=plain["top1"], top5=plain["top5"], k=plain["k"], weighted=weighted,
            weighted_by_k=by_k, features_from=cfg.knn.features, epochs=0, subset=None, num_classes=n_cls,
            n_train=int(tr_f.shape[0]), n_val=int(va_f.shape[0]), unreadable_images=unreadable)
    return C.finish(run_dir, info, results or {})


if __name__ == "__main__":
    hydra_main(STAGE, run)
