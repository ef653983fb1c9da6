"""Linear evaluation: a linear classifier on the frozen backbone (the paper's ImageNet protocol).

``run(cfg)`` (every process, after the launcher exported RANK/WORLD_SIZE/...), ``python -m transfer.linear
key=value ...`` or ``submit linear ...``. Config: ``configs/linear.yaml``; presets ``eval/linear=<name>``
(``imagenet``: 100 epochs, SGD momentum 0.9, lr 0.2 x bs/256, x0.1 at epochs 60 and 80, batch 256, wd 0;
``imagenet_multicrop``: base lr 0.4; ``synthetic``: the embedded set).

The backbone is loaded from ``weights`` (checked: the missing keys are exactly ``fc.weight``/``fc.bias``),
runs in eval mode with ``requires_grad`` off, only the classifier is in the optimizer, and after training
``check_frozen`` proves that no backbone tensor (weights or BN statistics) changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig

from common.stage import begin, hydra_main
from transfer import classification as C

STAGE = "linear"


def validate_config(cfg: Any, world_size: int = 1, check_paths: bool = True) -> DictConfig:
    """The launcher's up-front check (and the first thing ``run`` does)."""
    return C.validate_eval_config(cfg, STAGE, world_size=world_size, check_paths=check_paths)


def freeze_backbone(model: nn.Module) -> None:
    """Only the classifier ``fc`` trains: every other parameter stops requiring gradients."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))


def linear_mode(model: nn.Module) -> None:
    """The training mode of linear evaluation: the whole network in eval mode (BN uses its running
    statistics and never updates them); the classifier has no mode-dependent layer."""
    model.eval()


def run(cfg: DictConfig) -> dict | None:
    start = begin(cfg, validate_config, C.log, check_done=C.check_previous)
    if start.done is not None:
        return start.finished_result()
    cfg, info, run_dir = start.cfg, start.info, start.run_dir
    torch.manual_seed(cfg.seed)

    train_ds, val_ds = C.labelled_sets(cfg.data, C.train_transform(cfg.data), C.eval_transform(cfg.data))
    loaded = C.build_model(cfg, num_classes=len(train_ds.classes))
    model = loaded.model.to(info.device)
    freeze_backbone(model)
    snapshot = C.backbone_snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.optim.base_lr * cfg.optim.batch_size / 256.0
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    net = C.data_parallel(model, info)
    logger, resume = C.open_run(run_dir, cfg, info, loaded.identity)
    C.log.info("linear evaluation of %s (%s, %s, feature dim %d) on %s: %d train / %d val images, %d classes",
               loaded.source, loaded.arch, loaded.kind, loaded.feature_dim, cfg.data.root, len(train_ds), len(val_ds),
               len(train_ds.classes))
    try:
        fit = C.fit_classifier(
            model=net, optimizer=optimizer, peak_lrs=[lr],
            train_data=C.train_loader(train_ds, cfg.optim.batch_size, cfg.seed, cfg.data.workers),
            val_data=C.eval_loader(val_ds, cfg.optim.batch_size, cfg.data.workers),
            cfg=cfg, info=info, run_dir=run_dir, logger=logger, set_mode=linear_mode,
            state_to_save=lambda: model.fc.state_dict(), state_to_load=model.fc.load_state_dict, source=loaded.identity,
            resume=resume)
        C.check_frozen(model, snapshot)
    finally:
        logger.close()
    C.log.info("frozen-backbone check passed: no backbone tensor changed")
    unreadable = C.unreadable_images(run_dir, info, train=train_ds, val=val_ds)
    results = C.results_record(
        STAGE, cfg, loaded, info, top1=fit.final["top1"], top5=fit.final["top5"], best_top1=fit.best_top1,
        epochs=fit.epochs, steps=fit.steps, subset=None, num_classes=len(train_ds.classes), n_train=len(train_ds),
        n_val=fit.final.get("n", len(val_ds)), batch_size=cfg.optim.batch_size, lr=lr,
        frozen_backbone_check="passed", unreadable_images=unreadable, history=fit.history)
    if info.is_main:
        C.write_plot(run_dir, fit.history,
                     f"linear eval: {Path(str(cfg.weights)).name if cfg.weights else 'random init'}")
    return C.finish(run_dir, info, results)


if __name__ == "__main__":
    hydra_main(STAGE, run)
