"""Pretraining entry point: ``run(cfg)`` (called by the ``submit`` launcher in every process) and
``python -m pretrain.train key=value ...`` (Hydra main, one process or under torchrun-style variables).

Config: ``configs/pretrain.yaml`` with the groups of ``configs/pretrain/`` (data, model, method, optim,
preset). Choose a group option with ``pretrain/<group>=<option>`` (``method=<name>``
for the method group), a paper preset with ``pretrain/preset=<name>``, values with ``key=value``::

    python -m pretrain.train pretrain/preset=synthetic
    python -m pretrain.train pretrain/preset=imagenet_800ep data.root=/datasets/imagenet name=intl_800ep

``validate_config`` checks every key against the schema below (an unknown key or a bad value fails at
start with a message naming it and the fix); the method's own keys are checked by
``pretrain.methods.build_method``, the augmentation keys by ``pretrain.augment``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from common.config import merge_onto_schema
from common.datasets import DATA_KINDS, STL10_SPLITS
from common.errors import ConfigError
from common.resnet import FEATURE_DIMS
from common.stage import begin, hydra_main
from pretrain import augment
from pretrain.data_loading import dataset_size, steps_per_epoch
from pretrain.engine import PretrainEngine
from pretrain.methods import build_method
from pretrain.optim import EXCLUSIONS, OPTIMIZERS

log = logging.getLogger("pretrain")

AMP_MODES = ("auto", "off", "bf16", "fp16")
DTYPES = ("float32", "float64")
NONFINITE_MODES = ("stop", "skip")


# ------------------------------------------------------------------------------------------ schema
# The keys and types of a pretraining config. The values live in one place, the YAML under configs/
# (pretrain.yaml and its groups; the augmentation's defaults in pretrain.augment.AugConfig): a key
# without a value here is filled there, and a config that leaves one unset is refused by name.
@dataclass
class DataSchema:
    kind: str = MISSING  # common.datasets.DATA_KINDS: imagefolder | folder | filelist | stl10 | cifar10 | cifar100
    root: str = MISSING
    split: str = MISSING  # sub-folder of root holding the training images ("" = root itself); STL-10: its split
    val_split: Optional[str] = MISSING  # the monitor's validation split: a folder beside split (CIFAR, STL-10: any
    #                                     value = the test set); null: none (probe train top-1 only, no k-NN monitor)
    classes: Optional[str] = MISSING  # imagefolder: only the classes of this list (imagenet100, or a file); null: all
    file_list: Optional[str] = MISSING  # filelist: text file of image paths, one per line, relative to root/split
    eval_resize: int = MISSING  # the monitor's evaluation view: resize the shorter side, then centre-crop
    eval_crop: int = MISSING
    workers: int = MISSING  # DataLoader workers per process
    augment: Dict[str, Any] = MISSING  # pretrain.augment keys, validated and written out in full there


@dataclass
class ModelSchema:
    arch: str = MISSING
    small_stem: bool = MISSING  # 3x3 stride-1 stem, no max-pool (32-px images)
    zero_init_residual: Optional[bool] = MISSING  # null: True for ResNet-50/101, False for ResNet-18/34
    projector: List[int] = MISSING
    sync_bn: bool = MISSING  # batch norm over the global batch when there are several processes


@dataclass
class OptimSchema:
    name: str = MISSING  # sgd | lars (pretrain.optim.OPTIMIZERS)
    epochs: int = MISSING
    batch_size: int = MISSING  # GLOBAL batch; per process = batch_size / world size
    base_lr: float = MISSING  # lr = base_lr * batch_size / 256
    bias_base_lr: Optional[float] = MISSING  # the same for biases and norm parameters; null: base_lr
    weight_decay: float = MISSING
    exclude: str = MISSING  # bias_and_norm (1-D params: no decay, no LARS adaptation) | none
    momentum: float = MISSING
    lars_eta: float = MISSING  # LARS trust coefficient (name=lars)
    warmup_epochs: float = MISSING
    final_lr_ratio: float = MISSING  # the cosine ends at base lr * this
    ema_momentum: float = MISSING  # momentum encoder (method.ema=true): this -> 1 on a cosine


@dataclass
class TrainSchema:
    amp: str = MISSING  # auto (bf16/fp16 on GPU, off on CPU) | off | bf16 | fp16
    dtype: str = MISSING  # float32 | float64 (network and views; float64 runs without autocast)
    log_every: int = MISSING  # steps between metric rows / progress lines
    spectrum_every: int = MISSING  # steps between spectrum measurements (0: only at the end)
    spectrum_topk: int = MISSING  # k of the top-k condition number / entropy / eigenvalue curves (FroSSL: 14)
    ckpt_every_steps: int = MISSING  # steps between checkpoints (0: only at epoch ends); always per epoch
    keep_every_epochs: int = MISSING  # also keep epoch_<N>.pth every N epochs (0: none)
    keep_snapshots: int = MISSING  # how many epoch_<N>.pth to keep, the newest (0: all)
    max_steps: Optional[int] = MISSING  # cut the schedule at this many steps (quick runs, tests)
    on_nonfinite: str = MISSING  # stop | skip
    channels_last: bool = MISSING  # NHWC backbone and views
    ddp_bucket_mb: float = MISSING  # DistributedDataParallel bucket_cap_mb
    compile: bool = MISSING  # torch.compile of the network (and the EMA encoder), after the DDP wrap
    online_probe: Optional[bool] = MISSING  # linear probe on detached features; null: on when the data has labels
    probe_lr: float = MISSING  # the probe's own SGD (momentum 0.9)
    eval_every: int = MISSING  # epochs between the probe's validation passes (0: only at the end)
    knn_every: int = MISSING  # epochs between k-NN monitor passes (0: off)
    knn_train_images: int = MISSING  # the fixed training subset the k-NN votes from
    knn_k: int = MISSING
    knn_temperature: float = MISSING
    monitor_batch_size: int = MISSING  # GLOBAL batch of the monitor's feature extraction


@dataclass
class PretrainSchema:
    name: str = MISSING
    run_dir: str = MISSING
    seed: int = MISSING
    data: DataSchema = field(default_factory=DataSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    method: Dict[str, Any] = MISSING  # configs/method/<name>.yaml, checked by pretrain.methods
    optim: OptimSchema = field(default_factory=OptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate_config(cfg: Any, world_size: int = 1, check_paths: bool = True) -> DictConfig:
    """The config merged onto the schema (unknown keys and wrong types rejected) and checked.

    Returns a resolved, typed DictConfig. Raises ConfigError naming the problem and the fix.
    check_paths=False skips the check that the data folder exists (composing configs elsewhere).
    """
    merged = merge_onto_schema(cfg, PretrainSchema, "pretraining")
    unset = sorted(OmegaConf.missing_keys(merged))
    _check(not unset, f"the pretraining config leaves {unset} without a value; fix: compose it from "
                      "configs/pretrain.yaml (python -m pretrain.train / submit pretrain / "
                      "common.config.compose_config) or set them")
    d, m, o, t = merged.data, merged.model, merged.optim, merged.train
    d.augment = augment.config_dict(d.augment)  # every augmentation key written out (config.yaml, checkpoint)
    _check(m.arch in FEATURE_DIMS, f"model.arch={m.arch!r} is unknown; choose one of {sorted(FEATURE_DIMS)}")
    _check(len(m.projector) >= 1 and all(s > 0 for s in m.projector),
           f"model.projector={list(m.projector)}: give >= 1 positive layer sizes, e.g. [8192,8192,8192]")
    _check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    _check(o.batch_size >= 2, f"optim.batch_size must be >= 2, got {o.batch_size}")
    _check(o.batch_size % world_size == 0,
           f"optim.batch_size={o.batch_size} (the GLOBAL batch) is not divisible by the {world_size} processes; "
           f"fix: a multiple of {world_size}, e.g. {max(world_size, o.batch_size // world_size * world_size)}")
    _check(o.base_lr > 0 and o.momentum >= 0 and o.weight_decay >= 0 and o.warmup_epochs >= 0,
           "optim.base_lr must be > 0 and momentum, weight_decay, warmup_epochs >= 0")
    _check(o.name in OPTIMIZERS, f"optim.name={o.name!r} is unknown; choose one of {list(OPTIMIZERS)}")
    _check(o.exclude in EXCLUSIONS, f"optim.exclude={o.exclude!r}; choose one of {list(EXCLUSIONS)}")
    _check(o.lars_eta > 0, f"optim.lars_eta (the LARS trust coefficient) must be > 0, got {o.lars_eta}")
    _check(o.bias_base_lr is None or o.bias_base_lr > 0,
           f"optim.bias_base_lr must be null (= optim.base_lr) or > 0, got {o.bias_base_lr}")
    _check(0 <= o.final_lr_ratio <= 1, f"optim.final_lr_ratio must be in [0, 1], got {o.final_lr_ratio}")
    _check(0 <= o.ema_momentum <= 1, f"optim.ema_momentum must be in [0, 1], got {o.ema_momentum}")
    _check(t.amp in AMP_MODES, f"train.amp={t.amp!r}; choose one of {list(AMP_MODES)}")
    _check(t.dtype in DTYPES, f"train.dtype={t.dtype!r}; choose one of {list(DTYPES)}")
    _check(t.dtype == "float32" or t.amp in ("auto", "off"),
           f"train.dtype={t.dtype} runs without autocast, but train.amp={t.amp}; fix: train.amp=off (or float32)")
    _check(t.on_nonfinite in NONFINITE_MODES,
           f"train.on_nonfinite={t.on_nonfinite!r}; choose one of {list(NONFINITE_MODES)}")
    _check(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _check(t.spectrum_topk >= 1, f"train.spectrum_topk must be >= 1, got {t.spectrum_topk} (FroSSL's figures use 14)")
    counts = ("spectrum_every", "ckpt_every_steps", "keep_every_epochs", "keep_snapshots")
    _check(all(t[k] >= 0 for k in counts), f"train.{', train.'.join(counts)} must be >= 0")
    _check(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be null or >= 1, got {t.max_steps}")
    _check(d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")
    _check(d.eval_resize >= 1 and 1 <= d.eval_crop <= d.eval_resize,
           f"data.eval_resize={d.eval_resize} / data.eval_crop={d.eval_crop}: need 1 <= eval_crop <= eval_resize")
    _check(t.probe_lr > 0, f"train.probe_lr must be > 0, got {t.probe_lr}")
    monitor = ("eval_every", "knn_every")
    _check(all(t[k] >= 0 for k in monitor), f"train.{', train.'.join(monitor)} must be >= 0")
    _check(t.knn_train_images >= 1 and t.knn_k >= 1 and t.monitor_batch_size >= 1 and t.knn_temperature > 0,
           "train.knn_train_images, train.knn_k, train.monitor_batch_size must be >= 1 and train.knn_temperature > 0")
    _check(isinstance(merged.method.get("name"), str), "method needs a name (choose with method=<name>)")
    try:  # the method's own keys and values, checked by the registry that builds it (before anything is queued)
        build_method(merged.method, global_batch=o.batch_size, world_size=world_size)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(str(e)) from None
    _check(d.kind in DATA_KINDS, f"data.kind={d.kind!r} is unknown; choose one of {list(DATA_KINDS)}")
    _check(d.classes is None or d.kind == "imagefolder",
           f"data.classes={d.classes!r} applies to data.kind=imagefolder only; fix: data.classes=null")
    _check((d.file_list is not None) == (d.kind == "filelist"),
           "data.file_list (a text file of image paths) goes with data.kind=filelist and only with it; got "
           f"data.kind={d.kind}, data.file_list={d.file_list!r}")
    _check(d.kind != "stl10" or d.split in STL10_SPLITS,
           f"data.split={d.split!r} is not an STL-10 split; choose one of {list(STL10_SPLITS)} (pretraining: unlabeled "
           "or train+unlabeled)")
    if check_paths and d.kind in ("imagefolder", "folder", "filelist"):
        folder = Path(d.root) / d.split if d.split else Path(d.root)
        layout = {"imagefolder": "<root>/<split>/<class>/<image> (ImageNet layout)",
                  "folder": "<root>/<split>/**/<image> (any depth)",
                  "filelist": "the folder the paths of data.file_list are relative to"}[d.kind]
        _check(folder.is_dir(), f"data.root/data.split = {str(folder)!r} is not a folder; fix: set data.root to the "
                                f"dataset root with {layout}; for the embedded "
                                "set run `make data` (= `python -m common.synthetic --out data/synthetic`)")
        if d.kind == "filelist":
            _check(Path(d.file_list).is_file(), f"data.file_list={d.file_list!r} is not a file; fix: a text file with "
                                                "one image path per line, relative to data.root/data.split")
    return merged


def preflight(cfg: Any, world_size: int = 1) -> DictConfig:
    """What `submit` checks before queueing: validate_config, then the training set itself (an empty or
    unusable folder, fewer images than one global batch), read as the engine reads it."""
    merged = validate_config(cfg, world_size)
    steps_per_epoch(dataset_size(merged.data), int(merged.optim.batch_size), world_size)
    return merged


# ------------------------------------------------------------------------------------------ entry
def run(cfg: DictConfig) -> dict | None:
    """Pretrains (or resumes) the run of ``cfg`` in this process; the summary dict on rank 0, else None.

    Call once per process after the launcher exported RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
    MASTER_PORT (or none of them: one process).
    """
    start = begin(cfg, validate_config, log)
    if start.done is not None:
        return start.finished_result()
    if not start.info.is_main:
        log.setLevel(logging.WARNING)  # one progress stream: rank 0's
    summary = PretrainEngine(start.cfg, start.info).fit()
    return summary if start.info.is_main else None


if __name__ == "__main__":
    hydra_main("pretrain", run)
