"""The pieces the three classification evaluations share (linear, semi-supervised, k-NN): one place each.

- config schema (``EvalSchema``: name, run_dir, seed, weights, encoder, model, data, optim, train) and its
  validation (unknown keys, bad values, non-divisible global batch, missing folders: a message naming the
  key and the fix);
- transforms (training: RandomResizedCrop + flip; evaluation: resize + centre crop, the paper's 256/224),
  ImageFolder datasets and distributed loaders (an exact, unpadded shard sampler for evaluation);
- the backbone + classifier: a torchvision ResNet whose ``fc`` is the classifier, loaded from any
  checkpoint ``common.backbone_weights`` reads, with the load checked (missing keys == the classifier's);
- the frozen-backbone check (moco ``main_lincls.py`` sanity check, in our own words);
- the classifier training loop with epoch checkpoints, resume, progress lines with ETA, TensorBoard and
  metrics.jsonl, top-1/top-5 evaluation, results.json and COMPLETE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler
from omegaconf import MISSING, DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2

from common import features
from common.atomic import atomic_torch_save, atomic_write_text, save_figure
from common.backbone_weights import file_sha256, load_backbone_into, read_backbone_weights
from common.checkpoint import LAST_NAME, CheckpointError, find_resume_point, keep_previous_file
from common.config import differences, merge_onto_schema, to_plain
from common.datasets import check_stl10_files, open_image_set, require_labels
from common.distributed import DistInfo, barrier, get_rank, get_world_size, is_dist
from common.errors import ConfigError, UserError
from common.features import EXCLUDED, eval_loader, loader_kw  # noqa: F401 (eval_loader: C.eval_loader for the stages)
from common.imagefolder import unreadable_files_all_ranks, write_unreadable_list
from common.resnet import FEATURE_DIMS, build_resnet
from common.runlog import MetricsLogger, mark_complete, save_config, truncate_metrics, write_results
from common.schedule import StepSchedule
from transfer.subsets import resolve_subset_list

log = logging.getLogger("transfer")

CLASSIFIER_FORMAT = "intl-classifier"
EVAL_KINDS = ("imagefolder", "stl10")  # labelled image sets (common.datasets)
ENCODERS = ("online", "momentum")
SCHEDULES = ("step", "cosine")


class EvalConfigError(ConfigError):
    """A classification-evaluation config that cannot run; the message names the key and the fix."""


class FrozenBackboneError(RuntimeError):
    """The backbone of a linear evaluation changed during training (a bug, not a user error)."""


# ------------------------------------------------------------------------------------------ schema
# The keys and types of each evaluation's config. The values live in one place, the YAML under configs/
# (linear.yaml, semi.yaml, knn.yaml and the eval/ groups); a config that leaves a key unset is refused.
@dataclass
class ModelSchema:
    arch: Optional[str] = MISSING  # null: from the checkpoint; required when weights is null
    small_stem: Optional[bool] = MISSING  # null: from the checkpoint (False for random init)


@dataclass
class DataSchema:
    kind: str = MISSING  # EVAL_KINDS: imagefolder (train_dir / val_dir) | stl10 (root/stl10_binary: train / test)
    root: str = MISSING  # dataset root (ImageNet: holds train/ and val/; STL-10: holds stl10_binary/)
    classes: Optional[str] = MISSING  # imagefolder: only the classes of this list (imagenet100, or a file); null: all
    train_dir: str = MISSING  # ImageFolder of the training images (<class>/<image>); STL-10: the binary folder
    val_dir: str = MISSING  # ImageFolder of the validation images; STL-10: the binary folder
    workers: int = MISSING  # DataLoader workers per process
    train_crop: int = MISSING  # RandomResizedCrop size (training)
    min_scale: float = MISSING  # RandomResizedCrop scale lower bound
    val_resize: int = MISSING  # evaluation: resize the shorter side, then centre-crop
    val_crop: int = MISSING
    mean: List[float] = MISSING
    std: List[float] = MISSING


@dataclass
class OptimSchema:
    epochs: int = MISSING
    batch_size: int = MISSING  # GLOBAL batch; per process = batch_size / world size
    base_lr: float = MISSING  # classifier lr = base_lr * batch_size / 256
    momentum: float = MISSING
    weight_decay: float = MISSING
    schedule: str = MISSING  # step (x gamma at milestones, in epochs) | cosine (to 0)
    milestones: List[int] = MISSING
    gamma: float = MISSING


@dataclass
class SemiOptimSchema(OptimSchema):
    backbone_base_lr: float = MISSING  # backbone lr = this * batch_size / 256


@dataclass
class TrainSchema:
    log_every: int = MISSING  # steps between progress lines / metric rows
    eval_every: int = MISSING  # epochs between validation passes (the last epoch always)
    max_steps_per_epoch: Optional[int] = MISSING  # cut epochs short (quick runs, tests)


@dataclass
class SubsetSchema:
    list: Optional[str] = MISSING  # SimCLR-format list file (<wnid>_<id>.JPEG per line)
    percent: Optional[float] = MISSING  # no list: draw a class-balanced subset of this percentage from seed


@dataclass
class KnnSchema:
    k: int = MISSING  # plain majority vote (the paper's tables)
    weighted_k: int = MISSING  # temperature-weighted vote (InstDisc / DINO); 0 to skip
    temperature: float = MISSING
    weighted_ks: List[int] = MISSING  # more weighted votes from the same neighbours (DINO: 10, 20, 100, 200)
    features: Optional[str] = MISSING  # a transfer.embed run folder: read its features instead of computing them
    batch_size: int = MISSING  # GLOBAL batch for feature extraction


@dataclass
class EvalSchema:
    """What the three evaluations share."""
    name: str = MISSING
    run_dir: str = MISSING
    seed: int = MISSING
    # pretraining last.pth / torchvision .pth / official INTL / MoCo; null = random init
    weights: Optional[str] = MISSING
    allow_unfinished: bool = MISSING  # evaluate a pretraining checkpoint whose ``finished`` flag is not set
    encoder: str = MISSING  # online | momentum (the EMA / key / teacher encoder of the layouts that have one)
    checkpoint_key: Optional[str] = MISSING  # a layout not recognised: the state_dict's entry (dotted), e.g. teacher
    checkpoint_prefix: Optional[str] = MISSING  # ... and the backbone's key prefix in it, e.g. module.encoder.
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)


@dataclass
class LinearSchema(EvalSchema):
    optim: OptimSchema = field(default_factory=OptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)


@dataclass
class SemiSchema(EvalSchema):
    optim: SemiOptimSchema = field(default_factory=SemiOptimSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    subset: SubsetSchema = field(default_factory=SubsetSchema)


@dataclass
class KnnStageSchema(EvalSchema):
    knn: KnnSchema = field(default_factory=KnnSchema)


@dataclass
class EmbedSchema(EvalSchema):
    split: str = MISSING  # all | train | val
    format: str = MISSING  # npy | torch
    batch_size: int = MISSING  # GLOBAL batch of the feature extraction


SCHEMAS = {"linear": LinearSchema, "semi": SemiSchema, "knn": KnnStageSchema, "embed": EmbedSchema}
EMBED_SPLITS = ("all", "train", "val")
EMBED_FORMATS = ("npy", "torch")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise EvalConfigError(msg)


def validate_eval_config(cfg: Any, stage: str, world_size: int = 1, check_paths: bool = True) -> DictConfig:
    """The config merged onto the stage's schema (``SCHEMAS``: unknown keys, unset keys and wrong types
    rejected), resolved and checked."""
    if stage not in SCHEMAS:
        raise EvalConfigError(f"unknown evaluation stage {stage!r}; choose one of {sorted(SCHEMAS)}")
    merged = merge_onto_schema(cfg, SCHEMAS[stage], stage, EvalConfigError)
    unset = sorted(OmegaConf.missing_keys(merged))
    _check(not unset, f"the {stage} config leaves {unset} without a value; fix: compose it from "
                      f"configs/{stage}.yaml (python -m transfer.{stage} / submit {stage} / "
                      "common.config.compose_config) or set them")
    m, d = merged.model, merged.data
    _check(merged.encoder in ENCODERS, f"encoder={merged.encoder!r}; choose one of {list(ENCODERS)}")
    _check(m.arch is None or m.arch in FEATURE_DIMS,
           f"model.arch={m.arch!r} is unknown; choose one of {sorted(FEATURE_DIMS)}")
    _check(merged.weights is not None or m.arch is not None or (stage == "knn" and merged.knn.features is not None),
           "weights=null (random initialisation) needs model.arch; fix: pass weights=<checkpoint> or "
           "model.arch=resnet50 (and model.small_stem=true for 32-px images)")
    batch, what = {"knn": (lambda: merged.knn.batch_size, "knn.batch_size"),
                   "embed": (lambda: merged.batch_size, "batch_size")}.get(
        stage, (lambda: merged.optim.batch_size, "optim.batch_size"))
    batch = batch()
    _check(batch >= 1 and batch % world_size == 0,
           f"{what}={batch} (the GLOBAL batch) is not a positive multiple of the {world_size} processes; "
           f"fix: a multiple of {world_size}, e.g. {max(world_size, batch // world_size * world_size)}")
    if stage == "embed":
        _check(merged.split in EMBED_SPLITS, f"split={merged.split!r}; choose one of {list(EMBED_SPLITS)}")
        _check(merged.format in EMBED_FORMATS, f"format={merged.format!r}; choose one of {list(EMBED_FORMATS)}")
    elif stage != "knn":
        o, t = merged.optim, merged.train
        _check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
        _check(o.base_lr > 0 and o.momentum >= 0 and o.weight_decay >= 0,
               "optim.base_lr must be > 0; optim.momentum, weight_decay >= 0")
        _check(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}; choose one of {list(SCHEDULES)}")
        _check(list(o.milestones) == sorted(o.milestones) and all(0 < x for x in o.milestones),
               f"optim.milestones={list(o.milestones)} must be increasing positive epochs")
        _check(t.log_every >= 1 and t.eval_every >= 1, "train.log_every and train.eval_every must be >= 1")
        _check(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1,
               "train.max_steps_per_epoch must be null or >= 1")
    else:
        _check(merged.knn.k >= 1 and merged.knn.weighted_k >= 0 and merged.knn.temperature > 0,
               "knn.k must be >= 1, knn.weighted_k >= 0 (0 skips it), knn.temperature > 0")
        _check(all(k >= 1 for k in merged.knn.weighted_ks), f"knn.weighted_ks={list(merged.knn.weighted_ks)}: every k "
                                                            "must be >= 1 (or an empty list)")
        _check(merged.knn.features is None or merged.weights is None,
               "knn.features (a transfer.embed run folder) replaces the backbone: pass it or weights=, not both; the "
               "features' own weights are recorded in its embedding.json")
    _check(d.workers >= 0 and d.train_crop > 0 and d.val_crop > 0 and d.val_resize >= d.val_crop,
           "data.workers >= 0, data.train_crop/val_crop > 0 and data.val_resize >= data.val_crop are required")
    _check(0 < d.min_scale <= 1, f"data.min_scale must be in (0, 1], got {d.min_scale}")
    _check(d.kind in EVAL_KINDS, f"data.kind={d.kind!r}: the evaluations need labelled images; choose one of "
                                 f"{list(EVAL_KINDS)} (flat folders and file lists have no labels: pretraining only)")
    _check(d.classes is None or d.kind == "imagefolder",
           f"data.classes={d.classes!r} applies to data.kind=imagefolder only; fix: data.classes=null")
    _check(not (stage == "semi" and d.kind != "imagefolder"),
           f"semi-supervised fine-tuning reads ImageFolder trees (its subsets name files); data.kind={d.kind} is not "
           "one; fix: eval/data=imagenet (or another ImageFolder)")
    if stage == "semi":
        _check(merged.optim.backbone_base_lr >= 0,
               f"optim.backbone_base_lr must be >= 0, got {merged.optim.backbone_base_lr}")
        s = merged.subset
        _check((s.list is None) != (s.percent is None),
               "semi-supervised needs exactly one of subset.list (a SimCLR list file, e.g. 10percent.txt) "
               "and subset.percent (a class-balanced subset drawn from seed); got "
               f"list={s.list!r}, percent={s.percent!r}")
        _check(s.percent is None or 0 < s.percent <= 100, f"subset.percent must be in (0, 100], got {s.percent}")
    from_dump = stage == "knn" and merged.knn.features is not None
    if check_paths and from_dump:
        _check(Path(merged.knn.features).is_dir(), f"knn.features={merged.knn.features!r} is not a folder; fix: the "
                                                   "run folder of a `python -m transfer.embed split=all` run")
    if check_paths and d.kind == "stl10" and not from_dump:
        for split in ("train", "test"):
            try:
                check_stl10_files(d.root, split)
            except UserError as e:
                raise EvalConfigError(str(e)) from None
    if check_paths and d.kind == "imagefolder" and not from_dump:
        for key in ("train_dir", "val_dir"):
            folder = Path(d[key])
            _check(folder.is_dir(), f"data.{key} = {str(folder)!r} is not a folder; fix: set data.root to the dataset "
                                    "root holding train/<class>/<image> and val/<class>/<image> (ImageNet layout), or "
                                    f"data.{key} to the ImageFolder itself; for the embedded set run `python -m "
                                    "common.synthetic --out data/synthetic` and use "
                                    "data.root=data/synthetic/classification")
    if check_paths:
        if merged.weights is not None:
            _check(Path(merged.weights).is_file(), f"weights={merged.weights!r} is not a file; fix: pass a pretraining "
                                                   "last.pth, a converted torchvision .pth, or weights=null for "
                                                   "random init")
        if stage == "semi" and merged.subset.list is not None:
            s = merged.subset
            _check(resolve_subset_list(s.list).is_file(),
                   f"subset.list={s.list!r} is not a file; fix: subset.list=10percent or 1percent (SimCLR's lists, "
                   "shipped), a list file (one <wnid>_<id>.JPEG per line), or subset.percent=10")
    return merged


# ------------------------------------------------------------------------------------------ data
def train_transform(d: DictConfig):
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(d.train_crop, scale=(d.min_scale, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(d.mean), list(d.std))])


def eval_transform(d: DictConfig):
    """Resize the shorter side to ``val_resize`` and centre-crop ``val_crop`` (ImageNet: 256 / 224)."""
    return features.eval_transform(d.val_resize, d.val_crop, d.mean, d.std)


def image_set(d: DictConfig, split: str, transform, bad_target: int | None = None):
    """The ``train`` or ``val`` images of ``d``: the ImageFolder ``train_dir`` / ``val_dir`` (only the classes of
    ``data.classes`` when set), or STL-10's ``train`` / ``test`` split; labels required."""
    if d.kind == "stl10":
        ds = open_image_set("stl10", d.root, "train" if split == "train" else "test", transform)
    else:
        ds = open_image_set("imagefolder", Path(d[f"{split}_dir"]), "", transform, classes=d.classes,
                            bad_target=bad_target)
    require_labels(ds, "a classification evaluation")
    return ds


def labelled_sets(d: DictConfig, train_tf, val_tf, exclude_bad_train: bool = False):
    """The training and validation sets of ``d`` (``image_set``), same classes. An unreadable validation image
    (and a training one with ``exclude_bad_train``, the k-NN) is labelled ``EXCLUDED``; a training set otherwise
    trains on the neighbour that replaces it."""
    train_ds = image_set(d, "train", train_tf, EXCLUDED if exclude_bad_train else None)
    val_ds = image_set(d, "val", val_tf, EXCLUDED)
    check_same_classes(train_ds, val_ds)
    return train_ds, val_ds


def check_same_classes(train_ds, val_ds) -> None:
    if train_ds.classes != val_ds.classes:
        only_t = sorted(set(train_ds.classes) - set(val_ds.classes))[:5]
        only_v = sorted(set(val_ds.classes) - set(train_ds.classes))[:5]
        raise EvalConfigError(f"the training and validation folders have different classes ({len(train_ds.classes)} vs "
                              f"{len(val_ds.classes)}; only in train e.g. {only_t}, only in val e.g. {only_v}); "
                              "fix: both need the same <class> sub-folders")


def train_loader(dataset: Dataset, global_batch: int, seed: int, workers: int) -> DataLoader:
    """Shuffled, distributed (DistributedSampler; call ``.sampler.set_epoch``), drops the last partial batch
    when there is more than one batch in the epoch."""
    world = get_world_size()
    per_proc = global_batch // world
    sampler = DistributedSampler(dataset, num_replicas=world, rank=get_rank(), shuffle=True, seed=seed, drop_last=False)
    drop_last = len(sampler) > per_proc
    return DataLoader(dataset, batch_size=per_proc, sampler=sampler, drop_last=drop_last, **loader_kw(workers))


# ------------------------------------------------------------------------------------------ model
@dataclass
class LoadedBackbone:
    model: nn.Module          # a torchvision ResNet; ``fc`` is the classifier (nn.Identity without one)
    arch: str
    small_stem: bool
    feature_dim: int
    source: str               # the weights path, or "random init"
    kind: str                 # backbone_weights kind, or "random"
    identity: dict            # BackboneWeights.identity (path, sha256, step, finished, ...), or RANDOM_IDENTITY


def build_model(cfg: DictConfig, num_classes: int | None) -> LoadedBackbone:
    """The backbone from ``cfg.weights`` (or random init) with a linear classifier (None: no classifier).

    The checkpoint decides the architecture; ``model.arch`` / ``model.small_stem`` given as well must agree.
    The load is checked by ``common.backbone_weights.load_backbone_into``: every backbone key must load,
    nothing may be unexpected, the classifier stays as initialised here.
    """
    state, kind, source, identity = None, "random", "random init", dict(RANDOM_IDENTITY)
    if cfg.weights is not None:
        w = read_backbone_weights(cfg.weights, encoder=cfg.encoder, checkpoint_key=cfg.checkpoint_key,
                                  prefix=cfg.checkpoint_prefix)
        identity = w.identity
        check_finished(identity, cfg.allow_unfinished)
        for key, value in (("arch", w.arch), ("small_stem", w.small_stem)):
            if cfg.model[key] is not None and cfg.model[key] != value:
                raise EvalConfigError(f"model.{key}={cfg.model[key]!r} but {cfg.weights} holds a {w.arch}"
                                      f"{' (small stem)' if w.small_stem else ''}; fix: drop model.{key} (the "
                                      "checkpoint decides) or pass the matching checkpoint")
        arch, small_stem, state, kind, source = w.arch, w.small_stem, w.state_dict, w.kind, str(cfg.weights)
        log.info("backbone: %s", w.summary())
    else:
        arch, small_stem = cfg.model.arch, bool(cfg.model.small_stem)
        log.info("backbone: %s%s at random initialisation (the baseline)", arch, " (small stem)" if small_stem else "")
    # Seeded, so that a random initialisation (the baseline) is the same in every process and every run
    # (k-NN has no DDP broadcast to align the ranks).
    torch.manual_seed(int(cfg.seed))
    model = build_resnet(arch, small_stem=small_stem)
    dim = model.feature_dim  # from the architecture, never hard-coded
    if num_classes is not None:
        model.fc = nn.Linear(dim, num_classes)
        # The usual linear-probe initialisation (moco / the paper's code): N(0, 0.01), zero bias.
        nn.init.normal_(model.fc.weight, std=0.01)
        nn.init.zeros_(model.fc.bias)
    if state is not None:
        load_backbone_into(model, state, source=source)
    return LoadedBackbone(model, arch, small_stem, dim, source, kind, identity)


# ------------------------------------------------------------------------------------------ source identity
RANDOM_IDENTITY = {"path": None, "sha256": None, "kind": "random", "step": None, "epoch": None, "finished": None,
                   "snapshot": None}
# Keys that do not change what a run computes; a resumed or completed run may differ in them.
NEUTRAL_KEYS = ("data.workers", "train.log_every", "allow_unfinished")


class StaleRunError(UserError):
    """A run folder holds a run of other weights or another config than the one asked for."""


def check_finished(identity: dict, allow_unfinished: bool) -> None:
    """A pretraining checkpoint not marked ``finished`` is refused unless ``allow_unfinished`` (then a loud
    warning; results.json records ``source.finished: false`` and the step)."""
    if identity.get("finished") is not False or identity.get("snapshot"):
        return  # a snapshot (epoch_<N>.pth) is a kept epoch of a run that goes on: never rewritten, so final
    what = (f"weights={identity['path']} is a pretraining checkpoint of step {identity['step']} (epoch "
            f"{identity['epoch']}) that is not marked finished: the pretraining is still running or was stopped")
    if not allow_unfinished:
        raise EvalConfigError(f"{what}; its results would not be the final model's. Fix: wait until the pretraining "
                              "has finished (its run folder has COMPLETE), evaluate a kept snapshot epoch_<N>.pth "
                              "(train.keep_every_epochs), or pass allow_unfinished=true to evaluate this intermediate "
                              "checkpoint (results.json then records finished: false and the step)")
    log.warning("WARNING: %s; evaluating it anyway (allow_unfinished=true); results.json records finished: false",
                what)


def check_same_run(recorded: dict, cfg: DictConfig, sha256: str | None, where: Path) -> None:
    """Refuses to resume or reuse ``where`` (a classifier checkpoint or results.json holding ``source`` and
    ``config``) for other weights (their bytes' sha256) or a config that differs beyond ``NEUTRAL_KEYS``."""
    fix = (f"fix: evaluate under a new name= (a fresh run folder), or delete {where.parent} to redo it with the "
           "current weights and config")
    source = recorded.get("source")
    if not isinstance(source, dict) or "sha256" not in source:
        raise StaleRunError(f"{where} records no source checkpoint identity (written by an older version), so it "
                            f"cannot be checked against weights={cfg.weights}; {fix}")
    if source["sha256"] != sha256:
        was = (f"{source.get('path')} (sha256 {str(source['sha256'])[:12]}, step {source.get('step')}, finished "
               f"{source.get('finished')})" if source["sha256"] else "random initialisation")
        now = f"{cfg.weights} (sha256 {sha256[:12]})" if sha256 else "random initialisation"
        raise StaleRunError(f"{where} was computed from {was} but the weights now are {now}: the checkpoint changed "
                            f"(e.g. the pretraining went on) or another one was passed; {fix}")
    differ = differences(recorded.get("config") or {}, to_plain(cfg), ignore=NEUTRAL_KEYS)
    if differ:
        raise StaleRunError(f"{where} was computed with another config ({'; '.join(differ[:8])}); {fix}")


def check_previous(cfg: DictConfig, previous: dict, run_dir: Path) -> None:
    """``common.stage.begin``'s check of an already complete evaluation: same weights bytes, same config."""
    check_same_run(previous, cfg, file_sha256(cfg.weights) if cfg.weights is not None else None,
                   run_dir / "results.json")


def backbone_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every backbone tensor (parameters and buffers, not the classifier) for ``check_frozen``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def check_frozen(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Raises FrozenBackboneError naming the backbone tensors that differ from ``snapshot``."""
    current = model.state_dict()
    changed = [k for k, v in snapshot.items() if not torch.equal(current[k].detach().to(v.device), v)]
    if changed:
        raise FrozenBackboneError(f"the backbone changed during linear evaluation ({len(changed)} tensors, e.g. "
                                  f"{changed[:5]}): it must stay frozen (requires_grad False, eval mode, only fc in "
                                  "the optimizer); the results are not a linear evaluation")


def data_parallel(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several processes."""
    if info.world_size == 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """Top-1 / top-5 accuracy (percent) and mean loss over the whole (sharded) dataset, leaving out the
    samples labelled ``EXCLUDED`` (unreadable images); ``n`` is the number of images evaluated."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        keep = targets != EXCLUDED
        logits, targets = model(images).float()[keep], targets[keep]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        stats += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(),
                               F.cross_entropy(logits, targets, reduction="sum").item(), len(targets)],
                              dtype=torch.float64, device=device)
    if is_dist():
        torch.distributed.all_reduce(stats)
    model.train(was_training)
    n = max(stats[3].item(), 1.0)
    return {"top1": 100.0 * stats[0].item() / n, "top5": 100.0 * stats[1].item() / n, "loss": stats[2].item() / n,
            "n": int(stats[3].item())}


# ------------------------------------------------------------------------------------------ schedule
def lr_factor_schedule(o: DictConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """step -> multiplier of the peak lr: ``step`` (x gamma at each milestone epoch) or ``cosine`` (to 0)."""
    if o.schedule == "cosine":
        return StepSchedule(CosineParamScheduler(1.0, 0.0), total_steps, offset=0)
    milestones = [m * steps_per_epoch for m in o.milestones if m * steps_per_epoch < total_steps]
    if not milestones:  # every milestone lies after the (shortened) schedule: a constant lr
        return lambda step: 1.0
    values = [o.gamma ** i for i in range(len(milestones) + 1)]
    sched = MultiStepParamScheduler(values, num_updates=total_steps, milestones=milestones)
    return lambda step: float(sched(min(step, total_steps - 1) / total_steps))


# ------------------------------------------------------------------------------------------ run scaffolding
def open_run(run_dir: Path, cfg: DictConfig, info: DistInfo, source: dict) -> tuple[MetricsLogger, dict | None]:
    """config.yaml (rank 0), the metrics logger (a no-op on the other ranks) and the classifier checkpoint
    to resume (``run_dir/last.pth``, or when that cannot be read ``last.prev.pth``: ``find_resume_point``; None
    for a new run), read once here and checked to be of the same weights and config (``check_same_run``) before
    anything in the folder is rewritten. A resumed run's metrics rows after its checkpoint's step are dropped
    (they are logged again)."""
    point = find_resume_point(run_dir / LAST_NAME, load=load_classifier_checkpoint, snapshots=False)
    resume = point.state if point is not None else None
    if point is not None:
        check_same_run(resume, cfg, source["sha256"], point.path)
        if point.is_fallback:
            log.warning("checkpoint fallback: %s", point.describe())
    if info.is_main:
        if point is not None and point.step is not None:
            truncate_metrics(run_dir, point.step)
        save_config(run_dir, cfg)
    resumed_step = point.step if point is not None else None
    logger = MetricsLogger(run_dir, enabled=info.is_main,
                           purge_step=resumed_step + 1 if resumed_step is not None else None)
    if point is not None and point.is_fallback:
        logger.log(point.step, checkpoint_fallback=point.record())
    return logger, resume


def results_record(stage: str, cfg: DictConfig, loaded: LoadedBackbone, info: DistInfo, **figures: Any) -> dict:
    """results.json of a classification evaluation: ``figures`` (top1, top5, n_train, ...) plus what every
    evaluation records about its source, backbone, processes and config."""
    return {"stage": stage, **figures, "source_checkpoint": cfg.weights, "source": loaded.identity,
            "encoder": cfg.encoder,
            "weights_kind": loaded.kind, "arch": loaded.arch, "small_stem": loaded.small_stem,
            "feature_dim": loaded.feature_dim, "world_size": info.world_size, "config": to_plain(cfg)}


def unreadable_images(run_dir: Path, info: DistInfo, **splits: Dataset) -> dict:
    """``{counts, files}`` of the distinct unreadable images every rank found in each split (for results.json),
    listed in ``run_dir/unreadable_images.txt`` (rank 0). A collective: every rank calls it."""
    files = {split: unreadable_files_all_ranks(ds, info.device) for split, ds in splits.items()}
    if info.is_main:
        write_unreadable_list(run_dir, files)
    return {"counts": {split: len(f) for split, f in files.items()}, "files": files}


def finish(run_dir: Path, info: DistInfo, results: dict) -> dict | None:
    """results.json + COMPLETE (rank 0, both with the run's provenance), a barrier so that no rank leaves
    before the files exist; returns the results as written (rank 0)."""
    if info.is_main:
        results = write_results(run_dir, results)
        atomic_write_text(run_dir / "results.md", results_table(results))
        mark_complete(run_dir, {"top1": results.get("top1"), "top5": results.get("top5")})
        log.info("results: top-1 %.2f  top-5 %.2f -> %s", results.get("top1", float("nan")),
                 results.get("top5", float("nan")), run_dir / "results.json")
    barrier()
    return results if info.is_main else None


def results_table(results: dict) -> str:
    """results.md: the headline numbers as a Markdown table (the full record is results.json)."""
    rows = [("stage", results.get("stage")), ("source checkpoint", results.get("source_checkpoint") or "random init"),
            ("encoder", results.get("encoder")),
            ("arch (feature dim)", f"{results.get('arch')} ({results.get('feature_dim')})"),
            ("top-1 (%)", f"{results.get('top1', float('nan')):.2f}"),
            ("top-5 (%)", f"{results.get('top5', float('nan')):.2f}")]
    if results.get("best_top1") is not None:
        rows.append(("best top-1 over epochs (%)", f"{results['best_top1']:.2f}"))
    if results.get("weighted"):
        w = results["weighted"]
        rows.append((f"weighted k-NN k={w['k']} top-1 / top-5 (%)", f"{w['top1']:.2f} / {w['top5']:.2f}"))
    if results.get("k"):
        rows.append(("k", results["k"]))
    sub = results.get("subset")
    if sub:
        rows.append(("labelled subset", f"{sub.get('list') or str(sub.get('percent')) + '% balanced'} "
                                        f"({sub.get('n_images')} images)"))
    rows += [("epochs", results.get("epochs")),
             ("train / val images", f"{results.get('n_train')} / {results.get('n_val')}"),
             ("processes", results.get("world_size"))]
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class FitResult:
    final: dict               # validation metrics after the last epoch
    best_top1: float
    epochs: int
    steps: int
    history: list


_FRESH_RUN_FIX = ("delete it to restart this evaluation from epoch 0, or choose a new run folder "
                  "(name=... or run_dir=...)")
_CLASSIFIER_KEYS = ("model", "optimizer", "epoch", "best_top1", "history")


def load_classifier_checkpoint(path: Path) -> dict:
    """The resume checkpoint ``fit_classifier`` writes; a torn, foreign or incomplete file is a CheckpointError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"the resume checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                              f"fix: {_FRESH_RUN_FIX}") from e
    if not isinstance(saved, dict) or saved.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not a classifier checkpoint of this stage; fix: {_FRESH_RUN_FIX}")
    missing = [k for k in _CLASSIFIER_KEYS if k not in saved]
    if missing:
        raise CheckpointError(f"the resume checkpoint {path} lacks {missing}; fix: {_FRESH_RUN_FIX}")
    return saved


def fit_classifier(*, model: nn.Module, optimizer: torch.optim.Optimizer, peak_lrs: list[float],
                   train_data: DataLoader, val_data: DataLoader, cfg: DictConfig, info: DistInfo,
                   run_dir: Path, logger: MetricsLogger, set_mode: Callable[[nn.Module], None],
                   state_to_save: Callable[[], dict], state_to_load: Callable[[dict], None],
                   source: dict, resume: dict | None) -> FitResult:
    """The classifier training loop shared by linear and semi-supervised evaluation.

    ``peak_lrs``: one peak lr per optimizer param group, multiplied by the schedule every step.
    ``set_mode(model)`` puts the model in its training mode (linear: all eval; semi: train).
    ``state_to_save()`` / ``state_to_load(state)``: the model tensors this stage checkpoints (linear: fc only).
    ``source``: the weights' identity (``LoadedBackbone.identity``), saved in the checkpoint.
    ``resume``: the ``run_dir/last.pth`` that ``open_run`` read and checked (same weights and config), or
    None; that file is rewritten atomically after every epoch by rank 0.
    """
    o, t = cfg.optim, cfg.train
    steps_per_epoch = len(train_data)
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(t.max_steps_per_epoch))
    if steps_per_epoch < 1:
        raise EvalConfigError(f"the training set gives no full batch of {o.batch_size}; "
                              "fix: a smaller optim.batch_size")
    total = steps_per_epoch * o.epochs
    factor = lr_factor_schedule(o, total, steps_per_epoch)
    start_epoch, best, history = 0, 0.0, []
    ckpt = run_dir / LAST_NAME
    if resume is not None:
        saved = resume
        try:
            state_to_load(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt} does not fit this run's classifier ({type(e).__name__}: {e}); fix: "
                                  f"{_FRESH_RUN_FIX}") from e
        start_epoch, best, history = int(saved["epoch"]), float(saved["best_top1"]), list(saved["history"])
        log.info("resuming %s from epoch %d/%d (%s)", run_dir, start_epoch, o.epochs, ckpt)
    step = start_epoch * steps_per_epoch
    log.info("training %d epochs x %d steps, global batch %d (%d per process x %d), peak lr %s, schedule %s",
             o.epochs, steps_per_epoch, o.batch_size, o.batch_size // info.world_size, info.world_size,
             [round(lr, 6) for lr in peak_lrs], o.schedule)
    final = history[-1]["val"] if history else {}
    t0, step0 = time.time(), step
    for epoch in range(start_epoch, o.epochs):
        train_data.sampler.set_epoch(epoch)
        set_mode(model)
        run_loss, run_n = 0.0, 0
        for i, (images, targets) in enumerate(train_data):
            if i >= steps_per_epoch:
                break
            f = factor(step)
            for group, peak in zip(optimizer.param_groups, peak_lrs):
                group["lr"] = peak * f
            images, targets = images.to(info.device, non_blocking=True), targets.to(info.device, non_blocking=True)
            loss = F.cross_entropy(model(images), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch} step {step}; fix: a lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            run_loss, run_n = run_loss + loss.item(), run_n + 1
            if step % t.log_every == 0 or i + 1 == steps_per_epoch:
                rate = (time.time() - t0) / max(step - step0, 1)
                log.info("ep %d/%d step %d/%d loss %.4f lr %.4g | ETA %s", epoch + 1, o.epochs, step, total,
                         run_loss / run_n, peak_lrs[-1] * f, _fmt_time(rate * (total - step)))
                logger.log(step, prefix="train/", loss=run_loss / run_n, lr=peak_lrs[-1] * f, epoch=epoch + 1)
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == o.epochs:
            final = evaluate(model, val_data, info.device)
            best = max(best, final["top1"])
            history.append({"epoch": epoch + 1, "val": final})
            logger.log(step, prefix="val/", top1=final["top1"], top5=final["top5"], loss=final["loss"], epoch=epoch + 1)
            log.info("ep %d/%d val top-1 %.2f top-5 %.2f (best top-1 %.2f)", epoch + 1, o.epochs, final["top1"],
                     final["top5"], best)
        if info.is_main:
            keep_previous_file(ckpt)  # last.prev.pth: what a resume falls back to if last.pth cannot be read
            atomic_torch_save({"format": CLASSIFIER_FORMAT, "model": state_to_save(),
                               "optimizer": optimizer.state_dict(),
                               "epoch": epoch + 1, "step": step, "best_top1": best, "history": history,
                               "config": to_plain(cfg), "source": source}, ckpt)
    return FitResult(final=final, best_top1=best, epochs=o.epochs, steps=step, history=history)


def write_plot(run_dir: Path, history: list, title: str) -> None:
    """val top-1 / top-5 per epoch as ``accuracy.png`` (rank 0)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [h["val"]["top1"] for h in history], "o-", label="top-1")
    ax.plot(epochs, [h["val"]["top5"] for h in history], "s--", label="top-5")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, run_dir / "accuracy.png", dpi=100)


