"""`intl-convert INPUT OUTPUT [--to detectron2|torchvision] [--encoder online|momentum] [--check] [--force]`.

Converts a backbone from any checkpoint that :mod:`common.backbone_weights` reads (this project's
pretraining checkpoints, official INTL, solo-learn, Barlow Twins, DINO, MoCo v1/v2/v3, SimSiam, VISSL, timm,
plain torchvision ResNets; anything else with ``--checkpoint-key`` / ``--prefix``) into

- ``detectron2``: a pickle ``{"model": {d2 name: numpy array}, "__author__": ..., "matching_heuristics": True}``
  with detectron2's ResNet names (``stem.conv1``, ``res2``-``res5``, ``convK.norm``, ``shortcut``), for
  ``MODEL.WEIGHTS`` of the C4 Mask R-CNN (the settings it needs are printed: RGB input, torchvision pixel
  mean/std, ``STRIDE_IN_1X1 False``); or
- ``torchvision``: a state_dict that ``torchvision.models.<arch>()`` loads with only ``fc.*`` missing.

The output suffix picks the format when ``--to`` is absent (``.pkl`` detectron2, ``.pth``/``.pt`` torchvision).
The output is written to a temporary file in the target folder, verified (and with ``--check`` compared
numerically against the torchvision model), and only then renamed into place: a failed run leaves no file.
An existing OUTPUT is replaced only with ``--force``, and never when it is a training checkpoint (this project's
pretraining ``last.pth``, an official INTL or a MoCo checkpoint): converting drops its heads, optimizer and
resume state, which cannot be recovered. An OUTPUT that is a folder, or in a folder that cannot be written, is
refused before anything is read.

``--check`` (detectron2): builds detectron2's ResNet backbone with the detection stage's own settings
(``configs/detection/coco_R_50_C4_1x.yaml``: pixel mean/std, input format, STRIDE_IN_1X1; plus any
``--check-opts``), loads the file through ``DetectionCheckpointer`` and compares res2-res5 with torchvision's
layer1-layer4 on a random 0-255 RGB batch, each side normalised its own way (eval mode, float32); fails
above ``--tolerance`` (max difference relative to the largest output). Then it builds that stage's Mask
R-CNN C4 (extra-norm ROI head) and reports which of its keys these weights leave uninitialised, using the
stage's own rule (``transfer.detection.weights``): RPN, box/mask predictors and the extra res5 norm are
expected to be new, any backbone key is an error. Exit status: 0 written, 1 check failed, 2 unusable input or
output path.

The renaming is written here rather than calling detectron2's ``tools/convert-torchvision-to-d2.py``
because that script is not part of the installed package (and it converts every key without checking
counts, finiteness or leftovers); the idea (torchvision -> d2 names + matching heuristics) is the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
import warnings
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from common.atomic import atomic_path, atomic_pickle_dump, atomic_torch_save, check_writable
from common.backbone_weights import KINDS, TRAINING_KINDS, BackboneWeights, load_backbone_into, read_backbone_weights
from common.checkpoint import CheckpointError
from common.config import config_dir
from common.errors import UserError
from common.resnet import BOTTLENECK_ARCHS, build_resnet

FORMATS = ("detectron2", "torchvision")
# torchvision's ImageNet normalisation (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) on detectron2's 0-255 scale.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
PIXEL_MEAN = [round(255 * m, 3) for m in TORCHVISION_MEAN]  # [123.675, 116.28, 103.53]
PIXEL_STD = [round(255 * s, 3) for s in TORCHVISION_STD]  # [58.395, 57.12, 57.375]
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
DEFAULT_TOLERANCE = 1e-5  # max |d2 - torchvision| / max |torchvision output|; a correct conversion gives ~1e-6
TRANSFER_C4_CONFIG = config_dir() / "detection" / "coco_R_50_C4_1x.yaml"
_STAGES = (("res2", "layer1"), ("res3", "layer2"), ("res4", "layer3"), ("res5", "layer4"))


class ConversionError(CheckpointError):
    """The conversion cannot produce a correct file; the message names the problem and the fix."""


class CheckFailed(ConversionError):
    """``--check`` found a numerical or key mismatch; no output was written."""


# ----------------------------------------------------------------------------------------------------------
# torchvision -> detectron2 names


def detectron2_settings(arch: str) -> list[str]:
    """The detectron2 config (KEY VALUE pairs) that torchvision-style weights of ``arch`` need."""
    if arch not in DEPTHS:
        raise ConversionError(f"detectron2 has no ResNet matching {arch!r}; supported: {sorted(DEPTHS)}")
    opts = ["INPUT.FORMAT", "RGB",
            "MODEL.PIXEL_MEAN", str(PIXEL_MEAN),
            "MODEL.PIXEL_STD", str(PIXEL_STD),
            "MODEL.RESNETS.DEPTH", str(DEPTHS[arch]),
            "MODEL.RESNETS.STRIDE_IN_1X1", "False"]
    if DEPTHS[arch] < 50:
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    return opts


def detectron2_name(key: str) -> str | None:
    """detectron2 ResNet name of one torchvision ResNet key; None for keys that are not weights."""
    if key.endswith("num_batches_tracked"):
        return None  # a BN step counter, not a weight; FrozenBN has none and BN restarts it at 0
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", key)
    if m:
        return f"stem.conv1.{m.group(2)}" if m.group(1) == "conv1" else f"stem.conv1.norm.{m.group(2)}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if not m:
        raise ConversionError(f"{key!r} is not a torchvision ResNet key; cannot name it for detectron2")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    if not re.fullmatch(r"(conv\d|shortcut)(\.norm)?\.(weight|bias|running_mean|running_var)", rest):
        raise ConversionError(f"{key!r} is not a torchvision ResNet key; cannot name it for detectron2")
    return f"res{stage}.{block}.{rest}"


# Mean |gamma| of the residual branches' last BN below which a stage's branches count as switched off: 0 is
# torchvision's zero_init_residual start (ResNet-50/101), 1 the default init. The demo's 150-step ResNet-50 on
# 32-px views ended at 0.020 / 0.011 / 0.007 / 0.004 (layer1-4), and its k-NN was that of random init.
RESIDUAL_OFF_GAIN = 0.05


def residual_branch_gains(state_dict, arch: str) -> dict[str, float]:
    """Per stage (``layer1``-``layer4``): the mean |gamma| of the last BN of every residual branch (``bn3`` of a
    bottleneck, ``bn2`` of a basic block), i.e. how much the residual branches add to the shortcut path."""
    last = "bn3" if arch in BOTTLENECK_ARCHS else "bn2"
    gains = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        gammas = [v.detach().abs().float().flatten() for k, v in state_dict.items()
                  if re.fullmatch(rf"{stage}\.\d+\.{last}\.weight", k)]
        if gammas:
            gains[stage] = float(torch.cat(gammas).mean())
    return gains


def residual_branches_off(gains: dict[str, float]) -> bool:
    return bool(gains) and all(g < RESIDUAL_OFF_GAIN for g in gains.values())


def expected_weight_count(weights: BackboneWeights) -> int:
    """Conv weights + BN weight/bias/running_mean/running_var of the architecture (no counters)."""
    return sum(not k.endswith("num_batches_tracked") for k in weights.state_dict)


def to_detectron2(weights: BackboneWeights) -> "OrderedDict[str, np.ndarray]":
    """Renames a torchvision ResNet state_dict to detectron2's ResNet names, checking the result."""
    if weights.small_stem:
        raise ConversionError(f"{weights.source}: a small-stem (CIFAR, 3x3 conv1 without max-pool) {weights.arch} has "
                              "no detectron2 equivalent (detectron2's stem is 7x7 stride 2 + max-pool); fix: convert "
                              "with --to torchvision, or pretrain with the standard stem for detection transfer")
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for key, value in weights.state_dict.items():
        name = detectron2_name(key)
        if name is None:
            continue
        if name in out:
            raise ConversionError(f"two torchvision keys map to the detectron2 key {name!r}; "
                                  "this is a bug in the renaming")
        array = value.detach().cpu()
        out[name] = (array.float() if array.is_floating_point() else array).numpy()
    expected = expected_weight_count(weights)
    if len(out) != expected:  # cannot happen for a state_dict read_backbone_weights accepted; never skip the count
        raise ConversionError(f"converted {len(out)} tensors but a {weights.arch} has {expected}")
    return out


def detectron2_checkpoint(weights: BackboneWeights) -> dict:
    return {
        "model": to_detectron2(weights),
        # detectron2 reads a .pkl without __author__ as Caffe2 weights (and renames them): always set it.
        "__author__": f"intl-convert ({weights.kind}, {weights.encoder} encoder, {weights.arch})",
        "matching_heuristics": True,  # res5 goes to roi_heads.res5 in C4 models, the rest to backbone.*
    }


# ----------------------------------------------------------------------------------------------------------
# verification of what was written


def verify_torchvision_file(path: Path, weights: BackboneWeights) -> str:
    """Loads the written state_dict into the torchvision model; only fc.* may be missing."""
    import torchvision

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if weights.small_stem:
        model, target = (build_resnet(weights.arch, small_stem=True),
                         f"common.resnet.build_resnet({weights.arch!r}, small_stem=True)")
    else:
        model, target = getattr(torchvision.models, weights.arch)(weights=None), f"torchvision.models.{weights.arch}()"
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ConversionError(f"the written state_dict does not load into {target}: {e}") from e
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ConversionError(f"the written state_dict does not fit {target}: missing {missing}, "
                              f"unexpected {result.unexpected_keys}")
    for k, v in model.state_dict().items():
        if k in weights.state_dict and not torch.equal(v, weights.state_dict[k]):
            raise ConversionError(f"{k} changed on the way through the file")
    return f"loads into {target} with only {sorted(result.missing_keys) or 'no keys'} missing"


def verify_detectron2_file(path: Path, expected: dict) -> str:
    """Re-reads the written pickle the way detectron2 does and compares it with what was meant to be written."""
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    if "__author__" not in data or data.get("matching_heuristics") is not True:
        raise ConversionError(f"{path}: __author__ / matching_heuristics missing after writing")
    model = data["model"]
    if list(model) != list(expected["model"]) or any(
            not np.array_equal(model[k], expected["model"][k]) for k in model):
        raise ConversionError(f"{path}: the tensors read back differ from the ones written")
    return f"re-read {len(model)} arrays, __author__ {data['__author__']!r}, matching_heuristics True"


@dataclass
class StageDiff:
    stage: str  # detectron2 name
    torchvision: str
    max_abs: float
    max_rel: float  # max |diff| / max |torchvision output|

    def line(self) -> str:
        return f"{self.stage} vs {self.torchvision}: max |diff| {self.max_abs:.3e}, relative {self.max_rel:.3e}"


@dataclass
class KeyReport:
    config: str  # where the Mask R-CNN config came from
    expected_new: dict[str, list[str]] = field(default_factory=dict)  # category -> keys
    backbone_missing: list[str] = field(default_factory=list)  # errors
    unexplained: list[str] = field(default_factory=list)  # new non-backbone keys of no known head (errors)
    unused: list[str] = field(default_factory=list)  # converted keys the model did not take (errors)
    loaded: int = 0
    skipped_reason: str = ""

    @property
    def ok(self) -> bool:
        return not (self.backbone_missing or self.unexplained or self.unused)

    def lines(self) -> list[str]:
        if self.skipped_reason:
            return [f"Mask R-CNN C4 key report: not applicable ({self.skipped_reason})"]
        out = [f"Mask R-CNN C4 ({self.config}): {self.loaded} model tensors initialised from the converted weights; "
               "keys left uninitialised:"]
        for cat, keys in self.expected_new.items():
            out.append(f"  expected new   {cat}: {len(keys)} keys ({_prefixes(keys)})")
        if self.backbone_missing:
            out.append(f"  ERROR backbone keys missing: {len(self.backbone_missing)}: {_short(self.backbone_missing)}")
        if self.unexplained:
            out.append(f"  ERROR new keys outside the known heads: {_short(self.unexplained)}")
        if self.unused:
            out.append(f"  ERROR converted keys the model did not take: {_short(self.unused)}")
        out.append("  RPN, box/mask predictors and the extra res5 norm are expected to be new (they are not part of "
                   "a pretrained backbone); " + ("no backbone key is missing: OK" if self.ok else "a backbone key "
                                                 "missing or unused means the weights do not match: FAILED"))
        return out


@dataclass
class CheckReport:
    diffs: list[StageDiff]
    tolerance: float
    keys: KeyReport | None
    trivial_bn: bool = False

    @property
    def numerics_ok(self) -> bool:
        return all(d.max_rel <= self.tolerance for d in self.diffs)

    @property
    def ok(self) -> bool:
        return self.numerics_ok and (self.keys is None or self.keys.ok)


def _short(keys: Sequence[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _prefixes(keys: Iterable[str]) -> str:
    c = Counter(".".join(k.split(".")[:3]) for k in keys)
    return ", ".join(f"{p}.* x{n}" if n > 1 else p for p, n in c.items())


@contextmanager
def _quiet_loggers(names=("fvcore", "detectron2")):
    """detectron2/fvcore log their own load report; ours replaces it (with the expected keys told apart)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def transfer_detection_config(arch: str, opts: Sequence[str] = (), forced: Sequence[str] = ()):
    """The detection transfer stage's C4 config (configs/detection/coco_R_50_C4_1x.yaml, extra-norm ROI head),
    with the depth of ``arch``, the user's ``opts`` and then ``forced`` on top.

    Its pixel mean/std, input format and STRIDE_IN_1X1 are the stage's own, so --check verifies that the
    configs the transfer stage really runs fit the weights. Returns (cfg, description).
    """
    from transfer.detection.config import load_config  # also registers Res5ROIHeadsExtraNorm

    needed = ["MODEL.RESNETS.DEPTH", str(DEPTHS[arch])]
    if DEPTHS[arch] < 50:
        needed += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    with _bad_opts_message(opts):
        cfg = load_config(TRANSFER_C4_CONFIG, needed + list(opts))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(forced))
    if cfg.MODEL.RESNETS.NORM in ("SyncBN", "naiveSyncBN", "nnSyncBN"):
        cfg.MODEL.RESNETS.NORM = "BN"  # same keys and eval maths; SyncBN needs a process group to run
    where = TRANSFER_C4_CONFIG.relative_to(TRANSFER_C4_CONFIG.parents[2])
    extra = f" + {list(opts)}" if opts else ""
    return cfg, f"{where}{extra}, ROI head {cfg.MODEL.ROI_HEADS.NAME}"


@contextmanager
def _bad_opts_message(opts: Sequence[str]):
    try:
        yield
    except (KeyError, ValueError, AssertionError) as e:
        raise ConversionError(f"the detectron2 config for --check could not be built with the overrides {list(opts)} "
                              f"({type(e).__name__}: {e}); fix: pass --check-opts as valid detectron2 KEY VALUE pairs, "
                              "e.g. MODEL.RESNETS.STRIDE_IN_1X1 True") from e


def _load_with_checkpointer(model: torch.nn.Module, pkl_path: Path):
    """Loads through detectron2's checkpointer; returns its incompatible-keys result and the file's keys.

    ``DetectionCheckpointer.load`` only logs what it could not load; ``_load_file`` + ``_load_model`` are the
    two halves of ``load`` and return the result, which the report needs.
    """
    from detectron2.checkpoint import DetectionCheckpointer

    checkpointer = DetectionCheckpointer(model)
    with _quiet_loggers():
        checkpoint = checkpointer._load_file(str(pkl_path))
        if not checkpoint.get("matching_heuristics") or checkpoint.get("__author__") == "Caffe2":
            raise CheckFailed(f"{pkl_path} was read by detectron2 as {checkpoint.get('__author__')!r} weights "
                              "without our matching settings; this file was not written by intl-convert")
        file_keys = list(checkpoint["model"])
        return checkpointer._load_model(checkpoint), file_keys


def compare_backbone(pkl_path: Path, weights: BackboneWeights, opts: Sequence[str] = (), image_size: int = 64,
                     batch: int = 2, seed: int = 0) -> list[StageDiff]:
    """detectron2 ResNet (settings + ``opts``) loaded from ``pkl_path`` vs the torchvision model, eval mode."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    cfg, _ = transfer_detection_config(weights.arch, opts, forced=[
        "MODEL.RESNETS.OUT_FEATURES", str([s for s, _ in _STAGES]), "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.RESNETS.NORM", "FrozenBN"])  # FrozenBN = BN in eval mode
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    result, _ = _load_with_checkpointer(d2, pkl_path)
    if result.missing_keys or result.unexpected_keys or result.incorrect_shapes:
        raise CheckFailed(f"detectron2's ResNet did not take these weights completely: missing "
                          f"{_short(result.missing_keys)}, unexpected {_short(result.unexpected_keys)}, wrong shapes "
                          f"{_short([k for k, *_ in result.incorrect_shapes])}")
    with torch.device("meta"):  # skip the random init: every tensor is assigned from the weights
        tv = build_resnet(weights.arch, small_stem=weights.small_stem)
    tv = load_backbone_into(tv, weights, assign=True).eval()

    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g).float()  # 0-255, RGB
    tv_in = ((rgb / 255 - torch.tensor(TORCHVISION_MEAN).view(1, 3, 1, 1))
             / torch.tensor(TORCHVISION_STD).view(1, 3, 1, 1))
    d2_img = rgb if cfg.INPUT.FORMAT == "RGB" else rgb.flip(1)  # what detectron2's loader would feed
    d2_in = ((d2_img - torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1))
             / torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1))
    with torch.no_grad():
        d2_out = d2(d2_in)
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(tv_in))))
        tv_out = {}
        for _, layer in _STAGES:
            x = getattr(tv, layer)(x)
            tv_out[layer] = x
    diffs = []
    for stage, layer in _STAGES:
        a, b = d2_out[stage], tv_out[layer]
        if a.shape != b.shape:
            raise CheckFailed(f"{stage} has shape {tuple(a.shape)} but torchvision {layer} {tuple(b.shape)}")
        max_abs = (a - b).abs().max().item()
        scale = b.abs().max().item()
        diffs.append(StageDiff(stage, layer, max_abs, max_abs / scale if scale > 0 else float(max_abs > 0)))
    return diffs


def mask_rcnn_c4_key_report(pkl_path: Path, weights: BackboneWeights, opts: Sequence[str] = ()) -> KeyReport:
    """Which keys of the transfer stage's Mask R-CNN C4 stay uninitialised when these weights initialise it."""
    if DEPTHS.get(weights.arch, 0) < 50:
        return KeyReport(config="", skipped_reason=f"detectron2's C4 res5 head is built from bottleneck blocks; "
                                                   f"{weights.arch} weights need an FPN config")
    from detectron2.modeling import build_model

    from transfer.detection.weights import classify_incompatible

    # Only key names and shapes matter here: build on the meta device (no memory, no weight init).
    cfg, source = transfer_detection_config(weights.arch, opts, forced=["MODEL.DEVICE", "meta"])
    with _quiet_loggers(), torch.device("meta"):
        model = build_model(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        result, file_keys = _load_with_checkpointer(model, pkl_path)
    model_keys = list(model.state_dict())
    # The transfer stage's own rule for what is backbone and what may start new (one place for it).
    split = classify_incompatible(model_keys, result.missing_keys, result.unexpected_keys, result.incorrect_shapes)
    report = KeyReport(config=source)
    report.backbone_missing = split.missing_backbone + [k for k, *_ in split.wrong_shape_backbone]
    for key in split.expected_new + [k for k, *_ in split.wrong_shape_other]:
        name = next((n for n, pattern in _EXPECTED_NEW if re.match(pattern, key)), None)
        (report.expected_new.setdefault(name, []) if name else report.unexplained).append(key)
    # File keys that match no model key (by detectron2's suffix rule), whether or not the checkpointer lists
    # them as unexpected; and the number of model tensors that really came from the file.
    def matches(model_key: str, file_key: str) -> bool:
        return model_key == file_key or model_key.endswith("." + file_key)

    missing = set(result.missing_keys) | {k for k, *_ in result.incorrect_shapes}
    unmatched = [f for f in file_keys if not any(matches(m, f) for m in model_keys)]
    report.unused = unmatched + [k for k in split.unused if k not in unmatched]
    report.loaded = sum(1 for m in model_keys if m not in missing and any(matches(m, f) for f in file_keys))
    return report


# What the C4 Mask R-CNN is expected to learn from scratch on top of a pretrained backbone.
_EXPECTED_NEW = (("RPN head", r"proposal_generator\."),
                 ("box predictor", r"roi_heads\.box_predictor\."),
                 ("mask head (predictor + deconv)", r"roi_heads\.mask_head\."),
                 ("extra res5 norm", r"roi_heads\.res5\.[^0-9]"))


def check_detectron2(pkl_path: Path, weights: BackboneWeights, opts: Sequence[str] = (),
                     tolerance: float = DEFAULT_TOLERANCE, image_size: int = 64) -> CheckReport:
    diffs = compare_backbone(pkl_path, weights, opts, image_size=image_size)
    keys = mask_rcnn_c4_key_report(pkl_path, weights, opts)
    trivial = all(
        (torch.all(v == 0).item() if k.endswith("running_mean") else torch.all(v == 1).item())
        for k, v in weights.state_dict.items() if k.endswith(("running_mean", "running_var")))
    return CheckReport(diffs=diffs, tolerance=tolerance, keys=keys, trivial_bn=trivial)


# ----------------------------------------------------------------------------------------------------------
# the conversion


@dataclass
class ConvertResult:
    output: Path
    fmt: str
    weights: BackboneWeights
    converted: int
    check: CheckReport | None = None


def resolve_format(output: Path, to: str | None) -> str:
    suffix = output.suffix.lower()
    if to is None:
        if suffix == ".pkl":
            return "detectron2"
        if suffix in (".pth", ".pt"):
            return "torchvision"
        raise ConversionError(f"cannot tell the output format from {output.name!r}; fix: name it *.pkl (detectron2) "
                              "or *.pth (torchvision), or pass --to detectron2|torchvision")
    if to not in FORMATS:
        raise ConversionError(f"unknown output format {to!r}; choose one of {list(FORMATS)}")
    if to == "detectron2" and suffix != ".pkl":
        raise ConversionError(f"detectron2 weights must be named *.pkl (detectron2 picks its reader by the suffix), "
                              f"got {output.name!r}; fix: use e.g. {output.with_suffix('.pkl').name}")
    if to == "torchvision" and suffix == ".pkl":
        raise ConversionError(f"a torchvision state_dict named {output.name!r} would be read by detectron2 as a "
                              f"pickle; fix: use e.g. {output.with_suffix('.pth').name}")
    return to


# Checkpoints a run resumes from or a user keeps; intl-convert never replaces one (read_backbone_weights' kinds).
TRAINING_CHECKPOINT_KINDS = TRAINING_KINDS


def check_output_path(output: Path, input_path: Path, force: bool) -> None:
    """Refuses an output that is the input, a folder, unwritable, or an existing file (without ``force``; a
    training checkpoint even with it)."""
    if output.exists() and input_path.exists() and output.resolve() == input_path.resolve():
        raise ConversionError(f"the output {output} is the input; fix: choose another output path")
    if output.is_dir():
        raise ConversionError(f"the output {output} is a folder; fix: name a file in it, e.g. "
                              f"{output / input_path.with_suffix(output.suffix or '.pkl').name}")
    check_writable(output.parent)
    if not output.exists():
        return
    if not force:
        raise ConversionError(f"the output {output} exists; fix: choose another output path, or pass --force to "
                              "replace it")
    try:
        kind = read_backbone_weights(output).kind
    except UserError:
        kind = None  # not a checkpoint read_backbone_weights knows (e.g. an earlier detectron2 .pkl): replaceable
    if kind in TRAINING_CHECKPOINT_KINDS:
        raise ConversionError(f"the output {output} is a training checkpoint ({KINDS[kind]}); intl-convert never "
                              "replaces one, even with --force (its heads, optimizer and resume state would be lost); "
                              "fix: choose another output path")


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, to: str | None = None,
            encoder: str = "online", check: bool = False, check_opts: Sequence[str] = (),
            tolerance: float = DEFAULT_TOLERANCE, log: Callable[[str], None] = print,
            verbose: bool = False, force: bool = False, checkpoint_key: str | None = None,
            prefix: str | None = None) -> ConvertResult:
    """Converts ``input_path`` to ``output_path``; raises ConversionError / CheckpointError / WriteError, writing
    nothing. An existing output is replaced only with ``force`` (never a training checkpoint)."""
    input_path, output = Path(input_path), Path(output_path)
    fmt = resolve_format(output, to)
    check_output_path(output, input_path, force)
    if len(check_opts) % 2:
        raise ConversionError(f"--check-opts must be KEY VALUE pairs, got {list(check_opts)}")

    weights = read_backbone_weights(input_path, encoder=encoder, checkpoint_key=checkpoint_key, prefix=prefix)
    log(f"input: {input_path}")
    where = (f", backbone keys under {weights.prefix!r}" if weights.prefix else "") + \
        (f" in {weights.where!r}" if weights.where else "")
    log(f"  detected kind: {weights.kind} ({KINDS[weights.kind]}), encoder: {encoder}{where}")
    for note in weights.notes:
        log(f"  note: {note}")
    log(f"  architecture: {weights.arch}{' with the small (CIFAR) stem' if weights.small_stem else ''}, "
        f"{expected_weight_count(weights)} weight tensors (conv + BN weight/bias/running stats)")
    if weights.filled:
        log(f"  {len(weights.filled)} BN num_batches_tracked counters absent in the input (set to 0)")
    gains = residual_branch_gains(weights.state_dict, weights.arch)
    log("  residual branches, mean |gamma| of each block's last BN (layer1-4): "
        + " / ".join(f"{g:.3f}" for g in gains.values()))
    if residual_branches_off(gains):
        log(f"  WARNING: every stage's residual branches are nearly off (all below {RESIDUAL_OFF_GAIN}): the backbone "
            "is still close to its zero_init_residual start, so it has barely trained (its features come from the "
            "stem and the 1x1 shortcut convolutions alone); fine-tuning a detector from it shows nothing about the "
            "pretraining. Fix: pretrain longer, or with "
            "model.zero_init_residual=false for short runs on small views")
    _log_skipped(weights, log, verbose)

    with atomic_path(output) as tmp:  # checked before the rename: a failed check writes nothing
        if fmt == "detectron2":
            ckpt = detectron2_checkpoint(weights)
            atomic_pickle_dump(ckpt, tmp)
            converted = len(ckpt["model"])
            _log_renames(weights, log, verbose)
            log(f"verified: {verify_detectron2_file(tmp, ckpt)}")
            report = None
            if check:
                log(f"check: detectron2 ResNet with the transfer stage's settings ({TRANSFER_C4_CONFIG.name}"
                    f"{' + ' + ' '.join(check_opts) if check_opts else ''}) vs torchvision on a random RGB batch "
                    "(eval mode, float32) ...")
                report = check_detectron2(tmp, weights, check_opts, tolerance)
                _log_check(report, log)
                if not report.ok:
                    raise CheckFailed(_check_failure(report))
        else:
            atomic_torch_save(weights.state_dict, tmp)
            converted = len(weights.state_dict)
            status = verify_torchvision_file(tmp, weights)
            log(f"verified: the state_dict {status}")
            report = None
            if check:
                log("check: the torchvision output was reloaded and compared key by key (--check's numerical "
                    "comparison applies to detectron2 output)")

    if fmt == "detectron2":
        log(f"wrote {output}: {converted} tensors converted to detectron2 ResNet names "
            f"(stem, res2-res5, convK.norm, shortcut), __author__ set, matching_heuristics True")
        log("use it with these detectron2 settings (configs/detection/*.yaml have them for ResNet-50):")
        settings = detectron2_settings(weights.arch)
        for k, v in zip(settings[0::2], settings[1::2]):
            log(f"  {k} {v}")
        log(f"  MODEL.WEIGHTS {output}")
    else:
        log(f"wrote {output}: torchvision {weights.arch} state_dict with {converted} tensors (no fc.*)"
            + ("; load it into common.resnet.build_resnet(..., small_stem=True)" if weights.small_stem else ""))
    return ConvertResult(output=output, fmt=fmt, weights=weights, converted=converted, check=report)


def _skip_group(key: str) -> str:
    """'projector', 'module.encoder_k', 'ema_model.backbone', ...: how skipped keys are summarised."""
    parts = key.split(".")
    depth = 2 if parts[0] in ("module", "model", "ema_model") else 1
    return ".".join(parts[:depth]) if len(parts) > depth else key


def _log_skipped(weights: BackboneWeights, log, verbose: bool) -> None:
    if not weights.skipped:
        log("  skipped input keys: none")
        return
    groups = Counter(_skip_group(k) for k in weights.skipped)
    log(f"  skipped input keys (not part of the {weights.encoder} backbone): {len(weights.skipped)}: "
        + ", ".join(f"{g}* x{n}" if n > 1 else g for g, n in groups.items()))
    if verbose:
        for k in weights.skipped:
            log(f"    skipped {k}")


def _log_renames(weights: BackboneWeights, log, verbose: bool) -> None:
    log("  renamed: conv1 -> stem.conv1, bn1 -> stem.conv1.norm, layerN -> res(N+1), bnK -> convK.norm, "
        "downsample.0/.1 -> shortcut/shortcut.norm (num_batches_tracked counters dropped)")
    if verbose:
        for k in weights.state_dict:
            name = detectron2_name(k)
            log(f"    {k} -> {name if name else '(dropped: counter)'}")


def _log_check(report: CheckReport, log) -> None:
    for d in report.diffs:
        log(f"  {d.line()}")
    worst = max(report.diffs, key=lambda d: d.max_rel)
    log(f"  numerics: max relative difference {worst.max_rel:.3e} ({worst.stage}), tolerance {report.tolerance:.0e}: "
        + ("PASSED" if report.numerics_ok else "FAILED"))
    if report.trivial_bn:
        log("  note: every BN running mean is 0 and variance 1 in these weights, so the BN statistics mapping is "
            "exercised only trivially")
    if report.keys is not None:
        for line in report.keys.lines():
            log(f"  {line}")


def _check_failure(report: CheckReport) -> str:
    parts = []
    if not report.numerics_ok:
        worst = max(report.diffs, key=lambda d: d.max_rel)
        parts.append(f"detectron2's ResNet differs from the torchvision model by {worst.max_rel:.3e} relative at "
                     f"{worst.stage} (tolerance {report.tolerance:.0e}); the detectron2 settings used do not match "
                     "these weights (need RGB input, torchvision pixel mean/std, MODEL.RESNETS.STRIDE_IN_1X1 False)")
    if report.keys is not None and not report.keys.ok:
        parts.append("the Mask R-CNN C4 does not take the backbone completely (see the key report above)")
    return "check failed: " + "; ".join(parts) + "; no output was written"


# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="intl-convert",
        description="Convert a checkpoint's ResNet backbone to detectron2 (.pkl) or torchvision (.pth) weights. "
                    "Recognised layouts (detected from the content): " + "; ".join(f"{k}: {v}" for k, v in
                                                                                  KINDS.items()) + ".")
    p.add_argument("input", help="checkpoint to read (the kind is detected and printed)")
    p.add_argument("output", help="file to write; *.pkl = detectron2, *.pth = torchvision unless --to is given")
    p.add_argument("--to", choices=FORMATS, default=None, help="output format (default: from the output suffix)")
    p.add_argument("--encoder", choices=("online", "momentum"), default="online",
                   help="which encoder: the online network (default; DINO: the student) or the momentum / EMA / key / "
                        "teacher encoder of the layouts that have one")
    p.add_argument("--checkpoint-key", default=None, metavar="KEY",
                   help="for a layout not recognised: the entry holding the state_dict, a dotted path "
                        "(e.g. teacher, state_dict, classy_state_dict.base_model.model.trunk), as DINO's "
                        "--checkpoint_key")
    p.add_argument("--prefix", default=None, metavar="PREFIX",
                   help="for a layout not recognised: the key prefix of the ResNet backbone in that state_dict "
                        "(e.g. module.encoder.); default: the only ResNet found in it")
    p.add_argument("--check", action="store_true",
                   help="detectron2: compare detectron2's ResNet with the torchvision model numerically and report "
                        "which Mask R-CNN C4 keys stay new; fail (writing nothing) on a mismatch")
    p.add_argument("--check-opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="extra detectron2 config overrides for --check (e.g. to test another setting); "
                        "put them after INPUT OUTPUT")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"--check's max difference relative to the largest output (default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUTPUT (never a training checkpoint such as a pretraining last.pth)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every renamed and skipped key")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 written, 1 --check failed, 2 unusable input, output path or arguments (nothing written)."""
    args = build_parser().parse_args(argv)
    try:
        convert(args.input, args.output, to=args.to, encoder=args.encoder, check=args.check,
                check_opts=args.check_opts, tolerance=args.tolerance, verbose=args.verbose, force=args.force,
                checkpoint_key=args.checkpoint_key, prefix=args.prefix)
    except CheckFailed as e:
        print(f"intl-convert: {e}", file=sys.stderr)
        return 1
    except UserError as e:  # ConversionError, CheckpointError, WriteError, ...: a problem the user can fix
        print(f"intl-convert: error: {e}; no output was written", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
