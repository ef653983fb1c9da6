"""Semi-supervised fine-tuning on a labelled subset (the paper's 1% / 10% ImageNet protocol).

``run(cfg)`` (every process), ``python -m transfer.semi key=value ...`` or ``submit semi ...``.
Config: ``configs/semi.yaml``; presets ``eval/semi=<name>`` (``imagenet_1pct`` / ``imagenet_10pct``: 20
epochs, SGD momentum 0.9, backbone lr 0.006 and classifier lr 0.2 (x bs/256), cosine decay, batch 256,
wd 0; ``*_ema``: backbone lr 0.004 for EMA-pretrained models; ``synthetic``: the embedded set, 10%).

The subset is either a SimCLR list file (``subset.list``; every listed file must be in the training tree)
or a deterministic class-balanced ``subset.percent`` drawn from ``seed`` and saved in the run folder as
``subset_<percent>pct.txt`` in the same format. The whole network trains (BN in training mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Subset

from common.stage import begin, hydra_main
from transfer import classification as C
from transfer import subsets

STAGE = "semi"


def validate_config(cfg: Any, world_size: int = 1, check_paths: bool = True) -> DictConfig:
    return C.validate_eval_config(cfg, STAGE, world_size=world_size, check_paths=check_paths)


def select_subset(cfg: DictConfig, train_ds, run_dir: Path, is_main: bool) -> tuple[list[int], dict]:
    """The indices of the labelled subset in ``train_ds`` and a description for results.json."""
    root = str(cfg.data.train_dir)
    if cfg.subset.list is not None:
        names = subsets.read_subset_list(cfg.subset.list)
        info = {"list": str(cfg.subset.list), "list_file": str(subsets.resolve_subset_list(cfg.subset.list)),
                "percent": None}
    else:
        names = subsets.balanced_subset(train_ds.samples, cfg.subset.percent, cfg.seed)
        saved = run_dir / f"subset_{cfg.subset.percent:g}pct.txt"
        if is_main:
            subsets.write_subset_list(saved, names)
        info = {"list": None, "percent": float(cfg.subset.percent), "seed": int(cfg.seed), "saved_list": str(saved)}
    indices = subsets.subset_indices(train_ds.samples, names, root=root)
    classes = {train_ds.samples[i][1] for i in indices}
    info.update(n_images=len(indices), n_classes=len(classes), n_train_total=len(train_ds))
    return indices, info


def run(cfg: DictConfig) -> dict | None:
    start = begin(cfg, validate_config, C.log, check_done=C.check_previous)
    if start.done is not None:
        return start.finished_result()
    cfg, info, run_dir = start.cfg, start.info, start.run_dir
    torch.manual_seed(cfg.seed)

    full_train, val_ds = C.labelled_sets(cfg.data, C.train_transform(cfg.data), C.eval_transform(cfg.data))
    indices, subset_info = select_subset(cfg, full_train, run_dir, info.is_main)
    train_ds = Subset(full_train, indices)
    loaded = C.build_model(cfg, num_classes=len(full_train.classes))
    model = loaded.model.to(info.device)
    scale = cfg.optim.batch_size / 256.0
    backbone_lr, head_lr = cfg.optim.backbone_base_lr * scale, cfg.optim.base_lr * scale
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("fc.")], "lr": backbone_lr},
              {"params": list(model.fc.parameters()), "lr": head_lr}]
    optimizer = torch.optim.SGD(groups, lr=head_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    net = C.data_parallel(model, info)
    logger, resume = C.open_run(run_dir, cfg, info, loaded.identity)
    C.log.info("semi-supervised fine-tuning of %s (%s, %s, feature dim %d): %d labelled of %d train images "
               "(%s), %d val images, %d classes; backbone lr %.4g, classifier lr %.4g", loaded.source, loaded.arch,
               loaded.kind, loaded.feature_dim, len(train_ds), len(full_train),
               subset_info.get("list") or f"{subset_info['percent']:g}% balanced", len(val_ds),
               len(full_train.classes), backbone_lr, head_lr)
    try:
        fit = C.fit_classifier(
            model=net, optimizer=optimizer, peak_lrs=[backbone_lr, head_lr],
            train_data=C.train_loader(train_ds, cfg.optim.batch_size, cfg.seed, cfg.data.workers),
            val_data=C.eval_loader(val_ds, cfg.optim.batch_size, cfg.data.workers),
            cfg=cfg, info=info, run_dir=run_dir, logger=logger, set_mode=lambda m: m.train(),
            state_to_save=model.state_dict, state_to_load=model.load_state_dict, source=loaded.identity, resume=resume)
    finally:
        logger.close()
    unreadable = C.unreadable_images(run_dir, info, train=train_ds, val=val_ds)
    results = C.results_record(
        STAGE, cfg, loaded, info, top1=fit.final["top1"], top5=fit.final["top5"], best_top1=fit.best_top1,
        epochs=fit.epochs, steps=fit.steps, subset=subset_info, num_classes=len(full_train.classes),
        n_train=len(train_ds), n_val=fit.final.get("n", len(val_ds)), batch_size=cfg.optim.batch_size,
        backbone_lr=backbone_lr, classifier_lr=head_lr, unreadable_images=unreadable, history=fit.history)
    if info.is_main:
        C.write_plot(run_dir, fit.history, f"semi-supervised ({len(train_ds)} labelled)")
    return C.finish(run_dir, info, results)


if __name__ == "__main__":
    hydra_main(STAGE, run)
