"""k-NN evaluation on frozen backbone features (no training).

Two variants, as in the paper's tables and the usual SSL protocol:
- plain k-NN (k=5): majority vote of the k nearest training images (cosine similarity on
  L2-normalised features); ties are broken by the summed similarity of the tied classes.
- weighted k-NN (k=20): the InstDisc / DINO vote, each neighbour weighing exp(sim / T), T=0.07.

The library pieces live in ``common.features`` (``extract_features``) and ``common.knn`` (``knn_accuracy``),
shared with the pretraining engine's periodic k-NN monitor (``pretrain.monitor``). The stage
``run(cfg)`` / ``python -m transfer.knn key=value ...`` evaluates a checkpoint on an ImageFolder set.
"""

from __future__ import annotations

import time

from common.features import extract_features, readable
from common.knn import knn_accuracy
from common.runlog import MetricsLogger, save_config
from common.stage import begin, hydra_main
from transfer import classification as C

# ------------------------------------------------------------------------------------------ the stage
STAGE = "knn"


def validate_config(cfg, world_size: int = 1, check_paths: bool = True):
    return C.validate_eval_config(cfg, STAGE, world_size=world_size, check_paths=check_paths)


def run(cfg) -> dict | None:
    """k-NN evaluation of ``cfg.weights`` (or random init) on ``cfg.data``: features of the training and
    validation images (evaluation transform), then k=``knn.k`` plain and k=``knn.weighted_k`` weighted votes.
    top1/top5 in results.json are the plain k-NN's (the paper's tables); the weighted ones are under
    ``weighted``."""
    start = begin(cfg, validate_config, C.log, check_done=C.check_previous)
    if start.done is not None:
        return start.finished_result()
    cfg, info, run_dir = start.cfg, start.info, start.run_dir
    if info.is_main:
        save_config(run_dir, cfg)
    transform = C.eval_transform(cfg.data)
    train_ds, val_ds = C.labelled_sets(cfg.data, transform, transform, exclude_bad_train=True)
    loaded = C.build_model(cfg, num_classes=None)
    backbone = loaded.model.to(info.device)
    C.log.info("k-NN evaluation of %s (%s, %s, feature dim %d): %d train / %d val images, %d classes",
               loaded.source, loaded.arch, loaded.kind, loaded.feature_dim, len(train_ds), len(val_ds),
               len(train_ds.classes))
    t0 = time.time()
    tr_f, tr_y = extract_features(backbone, C.eval_loader(train_ds, cfg.knn.batch_size, cfg.data.workers), info.device,
                                  progress=info.is_main)
    va_f, va_y = extract_features(backbone, C.eval_loader(val_ds, cfg.knn.batch_size, cfg.data.workers), info.device,
                                  progress=info.is_main)
    unreadable = C.unreadable_images(run_dir, info, train=train_ds, val=val_ds)
    (tr_f, tr_y), (va_f, va_y) = (readable(tr_f, tr_y), readable(va_f, va_y))
    if tr_f.shape[1] != loaded.feature_dim:
        raise RuntimeError(f"the backbone gave {tr_f.shape[1]} features, "
                           f"expected {loaded.feature_dim} for {loaded.arch}")
    results = None
    if info.is_main:
        n_cls = len(train_ds.classes)
        plain = knn_accuracy(tr_f, tr_y, va_f, va_y, k=cfg.knn.k, weighted=False, num_classes=n_cls)
        weighted = (knn_accuracy(tr_f, tr_y, va_f, va_y, k=cfg.knn.weighted_k, weighted=True,
                                 temperature=cfg.knn.temperature, num_classes=n_cls) if cfg.knn.weighted_k else None)
        logger = MetricsLogger(run_dir, enabled=True)
        logger.log(0, prefix=f"knn{plain['k']}/", top1=plain["top1"], top5=plain["top5"])
        if weighted:
            logger.log(0, prefix=f"knn{weighted['k']}_weighted/", top1=weighted["top1"], top5=weighted["top5"])
        logger.close()
        C.log.info("k-NN (k=%d): top-1 %.2f top-5 %.2f%s  [%.0fs]", plain["k"], plain["top1"], plain["top5"],
                   f"; weighted k-NN (k={weighted['k']}, T={cfg.knn.temperature}): top-1 {weighted['top1']:.2f} "
                   f"top-5 {weighted['top5']:.2f}" if weighted else "", time.time() - t0)
        results = C.results_record(
            STAGE, cfg, loaded, info, top1=plain["top1"], top5=plain["top5"], k=plain["k"], weighted=weighted,
            epochs=0, subset=None, num_classes=n_cls, n_train=int(tr_f.shape[0]), n_val=int(va_f.shape[0]),
            unreadable_images=unreadable)
    return C.finish(run_dir, info, results or {})


if __name__ == "__main__":
    hydra_main(STAGE, run)
