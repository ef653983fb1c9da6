"""Read any supported checkpoint into a torchvision ResNet state_dict (the one shared checkpoint reader).

Recognised inputs (the kind is detected from the content, never from the file name):

=================  ==========================================================  ======================
kind               layout                                                      momentum encoder
=================  ==========================================================  ======================
``intl-pretrain``  this project's pretraining checkpoint (pretrain/checkpoint)  ``ema_model`` (EMA)
                   ``ckpt["model"]["backbone.<torchvision key>"]``
``official-intl``  the official INTL code: ``ckpt["state_dict"]`` with keys      ``module.momentum_
                   ``module.backbone.<key>`` (DDP-wrapped)                      backbone.<key>``
``moco``           MoCo-style: ``ckpt["state_dict"]["module.encoder_q.<key>"]``  ``module.encoder_k.``
``torchvision``    a plain torchvision ResNet state_dict (``conv1.weight``...)   none
=================  ==========================================================  ======================

A leading ``module.`` (DDP) is accepted everywhere. The result always holds exactly the tensors of the
inferred torchvision ResNet (conv, BN weight/bias/running stats; ``num_batches_tracked`` filled with 0
when the source lacks it; floating tensors as float32) and never ``fc.*``; every other input key is listed
in ``skipped``. A pretraining checkpoint's tensors must also agree with its own ``config.model``.
Anything else (not a checkpoint, empty, unknown prefix, a missing layer, wrong shapes, NaN/Inf) raises
:class:`common.checkpoint.CheckpointError` with a message naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from common.checkpoint import BACKBONE_PREFIX, CheckpointError, is_pretrain_checkpoint
from common.resnet import FEATURE_DIMS, build_resnet

KINDS = ("intl-pretrain", "official-intl", "moco", "torchvision")
ENCODERS = ("online", "momentum")

# kind -> (online prefix, momentum prefix) inside the (``module.``-stripped) state_dict.
_PREFIXES = {
    "official-intl": ("backbone.", "momentum_backbone."),
    "moco": ("encoder_q.", "encoder_k."),
    "torchvision": ("", None),
}
# The first component of every torchvision ResNet key (fc is the classifier, never converted).
_RESNET_TOP = re.compile(r"^(conv1|bn1|layer[1-4]|fc)\.")
_OPTIONAL = "num_batches_tracked"


@dataclass
class BackboneWeights:
    """A backbone's weights as a torchvision ResNet state_dict (without ``fc.*``)."""

    state_dict: "OrderedDict[str, torch.Tensor]"
    kind: str  # one of KINDS
    arch: str  # "resnet18" / "resnet34" / "resnet50" / "resnet101"
    small_stem: bool  # CIFAR-style 3x3 stride-1 conv1 without max-pool
    skipped: list[str] = field(default_factory=list)  # input keys not converted
    encoder: str = "online"
    source: str = "<object>"
    prefix: str = ""  # the input key prefix the backbone was read from
    filled: list[str] = field(default_factory=list)  # num_batches_tracked buffers absent in the source
    # What the weights were read from: path, sha256 of the file's bytes, kind, encoder, and for a pretraining
    # checkpoint its step, epoch and ``finished`` flag (None for other kinds). See ``source_identity``.
    identity: dict = field(default_factory=dict)

    @property
    def num_tensors(self) -> int:
        return len(self.state_dict)

    def summary(self) -> str:
        where = f"{self.prefix!r}" if self.prefix else "top level"
        return (f"{self.source}: kind={self.kind}, encoder={self.encoder}, arch={self.arch}"
                f"{' (small stem)' if self.small_stem else ''}, {self.num_tensors} backbone tensors read from "
                f"{where}, {len(self.skipped)} input keys skipped")


# ----------------------------------------------------------------------------------------------------------
# reading


def read_backbone_weights(path_or_obj: str | os.PathLike | Mapping[str, Any],
                          encoder: str = "online") -> BackboneWeights:
    """Reads a checkpoint file (or an already loaded object) and returns its backbone's weights.

    encoder: "online" (the trained network) or "momentum" (the EMA / key encoder, when there is one).
    Raises CheckpointError naming the problem and the fix.
    """
    if encoder not in ENCODERS:
        raise CheckpointError(f"unknown encoder {encoder!r}; choose one of {list(ENCODERS)}")
    sha256 = None
    if isinstance(path_or_obj, (str, os.PathLike)):
        source = str(path_or_obj)
        obj, sha256 = _load_file(Path(path_or_obj))
    else:
        source, obj = "<object>", path_or_obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a checkpoint dict; fix: pass a pretraining "
                              "checkpoint (.pth), an official INTL / MoCo checkpoint or a torchvision ResNet "
                              "state_dict")

    if is_pretrain_checkpoint(obj):
        kind = "intl-pretrain"
        state, other_sd, other_name = _intl_pretrain_state(obj, encoder, source)
        prefix = BACKBONE_PREFIX
        skipped_extra = [f"{other_name}.{k}" for k in (other_sd or {})]
    else:
        state = _find_state_dict(obj, source)
        kind = _detect_kind(state, source)
        online, momentum = _PREFIXES[kind]
        if encoder == "momentum":
            if momentum is None or not any(k.startswith(momentum) for k in _strip_module(state)):
                raise CheckpointError(
                    f"{source} ({kind}) has no momentum encoder; key prefixes found: {_describe_prefixes(state)}; "
                    "fix: use --encoder online (encoder='online')")
            prefix = momentum
        else:
            prefix = online
        skipped_extra = []

    weights = _extract(state, prefix, kind, source)
    if kind == "intl-pretrain":
        _check_against_config(weights, obj.get("config"), source)
    weights.encoder = encoder
    weights.skipped = weights.skipped + skipped_extra
    pretrain = kind == "intl-pretrain"
    weights.identity = {
        "path": str(Path(source).resolve()) if sha256 else source, "sha256": sha256, "kind": kind, "encoder": encoder,
        "step": obj.get("step") if pretrain else None, "epoch": obj.get("epoch") if pretrain else None,
        "finished": bool(obj.get("finished", False)) if pretrain else None,
        "snapshot": bool(obj.get("snapshot", False)) if pretrain else None}
    return weights


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks): the identity of a checkpoint file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_file(path: Path) -> tuple[Any, str]:
    """The loaded object and the sha256 of exactly the bytes it was loaded from (one read of the file: a
    checkpoint renamed over ``path`` meanwhile cannot mix two versions)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; fix: pass the path of a checkpoint file")
    data = path.read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False), hashlib.sha256(data).hexdigest()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        if _is_detectron2_pickle(path):
            raise CheckpointError(f"{path} is a detectron2 / Caffe2 weights pickle (already converted); fix: use it "
                                  "directly as MODEL.WEIGHTS, or pass the original pretraining .pth") from e
        raise CheckpointError(f"{path} is not a checkpoint: torch.load failed ({type(e).__name__}: {str(e)[:200]}); "
                              "fix: pass a .pth/.pt/.tar file written by torch.save") from e


def _is_detectron2_pickle(path: Path) -> bool:
    import pickle

    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except Exception:  # noqa: BLE001 - not a plain pickle either
        return False
    return isinstance(data, Mapping) and ("model" in data or "blobs" in data)


def _intl_pretrain_state(obj: Mapping, encoder: str, source: str):
    if encoder == "momentum":
        state = obj.get("ema_model")
        if not state:
            raise CheckpointError(f"{source} is a pretraining checkpoint without a momentum (EMA) encoder "
                                  "(ema_model is empty); fix: use --encoder online, or pretrain with the EMA variant")
        return state, obj.get("model"), "model"
    state = obj.get("model")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} is a pretraining checkpoint without a 'model' state_dict; "
                              "fix: pass a checkpoint written by the pretraining engine")
    return state, obj.get("ema_model"), "ema_model"


def _check_against_config(weights: BackboneWeights, config: Any, source: str) -> None:
    """A pretraining checkpoint names its backbone in config.model; the tensors must agree with it."""
    model_cfg = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(model_cfg, Mapping):
        return
    arch, small = model_cfg.get("arch"), model_cfg.get("small_stem")
    if arch is not None and arch != weights.arch:
        raise CheckpointError(f"{source}: its config says model.arch={arch} but the backbone tensors are a "
                              f"{weights.arch}; the checkpoint is inconsistent, fix: use the run's own last.pth")
    if small is not None and bool(small) != weights.small_stem:
        raise CheckpointError(f"{source}: its config says model.small_stem={small} but conv1 is "
                              f"{'3x3' if weights.small_stem else '7x7'}; the checkpoint is inconsistent, "
                              "fix: use the run's own last.pth")


def _find_state_dict(obj: Mapping, source: str) -> Mapping[str, Any]:
    """The state_dict inside a checkpoint: ``state_dict``/``model`` entries, or the object itself."""
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _looks_like_state_dict(inner):
            return inner
    if _looks_like_state_dict(obj):
        return obj
    if len(obj) == 0 or any(isinstance(obj.get(k), Mapping) and len(obj[k]) == 0 for k in ("state_dict", "model")):
        raise CheckpointError(f"{source} has an empty state_dict (no tensors at all); fix: pass the checkpoint "
                              "saved after training, not an empty or truncated one")
    found = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:12])
    raise CheckpointError(f"{source} holds no state_dict of tensors; top-level entries found: {found}; fix: pass a "
                          "pretraining checkpoint, an official INTL / MoCo checkpoint (with 'state_dict') or a "
                          "torchvision ResNet state_dict")


def _looks_like_state_dict(d: Mapping) -> bool:
    return (len(d) > 0 and all(isinstance(k, str) for k in d)
            and sum(torch.is_tensor(v) for v in d.values()) >= len(d) / 2)


def _strip_module(state: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Removes one leading ``module.`` (DDP / DataParallel) from every key that has it."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def _detect_kind(state: Mapping[str, Any], source: str) -> str:
    keys = list(_strip_module(state))
    if any(k.startswith("backbone.") or k.startswith("momentum_backbone.") for k in keys):
        return "official-intl"
    if any(k.startswith("encoder_q.") or k.startswith("encoder_k.") for k in keys):
        return "moco"
    if any(k in ("conv1.weight", "layer1.0.conv1.weight") for k in keys):
        return "torchvision"
    raise CheckpointError(f"{source} has no recognisable ResNet backbone; key prefixes found: "
                          f"{_describe_prefixes(state)}; supported: 'backbone.' (this project), 'module.backbone.' "
                          "(official INTL), 'module.encoder_q.' (MoCo) or plain torchvision keys ('conv1.weight', "
                          "'layer1.0...'); fix: pass one of those, or rename the keys")


def _describe_prefixes(state: Mapping[str, Any], limit: int = 10) -> str:
    """'module.net.' (320 keys), ... : the part of each key before a torchvision ResNet key, else its first 2 parts."""
    counts: Counter = Counter()
    for k in state:
        m = re.search(r"(^|\.)(conv1|bn1|layer[1-4]|fc)\.", k)
        if m:
            counts[k[: m.start(2)] or "<none>"] += 1
        else:
            parts = k.split(".")
            counts[".".join(parts[:2]) + ("." if len(parts) > 2 else "")] += 1
    items = [f"{p!r} ({n} keys)" for p, n in counts.most_common(limit)]
    if len(counts) > limit:
        items.append(f"... {len(counts) - limit} more")
    return ", ".join(items) if items else "none (no keys)"


def _extract(state: Mapping[str, Any], prefix: str, kind: str, source: str) -> BackboneWeights:
    if len(state) == 0:
        raise CheckpointError(f"{source} has an empty state_dict; fix: pass the checkpoint saved after training")
    full_prefix_of: dict[str, str] = {}
    picked: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    skipped: list[str] = []
    for raw_key, value in state.items():
        key = raw_key[len("module."):] if raw_key.startswith("module.") else raw_key
        if prefix and not key.startswith(prefix):
            skipped.append(raw_key)
            continue
        name = key[len(prefix):]
        if not _RESNET_TOP.match(name) or name.startswith("fc."):
            skipped.append(raw_key)  # projector / heads / classifier
            continue
        if not torch.is_tensor(value):
            raise CheckpointError(f"{source}: {raw_key} is a {type(value).__name__}, not a tensor; "
                                  "fix: pass a checkpoint whose state_dict holds tensors")
        if name in picked:
            raise CheckpointError(f"{source}: two input keys map to the backbone key {name!r} "
                                  f"({full_prefix_of[name]!r} and {raw_key!r}); fix: keep one copy of the backbone")
        full_prefix_of[name] = raw_key
        value = value.detach().cpu()
        picked[name] = value.float() if value.is_floating_point() else value  # fp16/bf16 copies -> float32
    if not picked:
        raise CheckpointError(f"{source} ({kind}) has no backbone tensors under {prefix!r}; key prefixes found: "
                              f"{_describe_prefixes(state)}; fix: pass a checkpoint with a ResNet backbone")

    arch, small_stem = _infer_arch(picked, source)
    reference = _reference_shapes(arch, small_stem)
    missing = [k for k in reference if k not in picked and not k.endswith(_OPTIONAL)]
    n_required = sum(not k.endswith(_OPTIONAL) for k in reference)
    unexpected = [full_prefix_of[k] for k in picked if k not in reference]
    if missing:
        raise CheckpointError(
            f"{source} ({kind}, {prefix!r}) is an incomplete {arch}: {len(missing)} of {n_required} backbone "
            f"tensors missing: {_group_keys(missing, reference)}; fix: pass a checkpoint with the full backbone")
    if unexpected:
        raise CheckpointError(f"{source} ({kind}) has backbone keys that a torchvision {arch} does not have: "
                              f"{_shorten(unexpected)}; fix: pass a standard torchvision-layout ResNet")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(reference[k])})" for k, v in picked.items()
             if tuple(v.shape) != tuple(reference[k])]
    if wrong:
        raise CheckpointError(f"{source} ({kind}): tensor shapes do not match a torchvision {arch}: {_shorten(wrong)}; "
                              "fix: pass a standard-width ResNet checkpoint")
    bad = [k for k, v in picked.items() if not _all_finite(v)]
    if bad:
        raise CheckpointError(f"{source} ({kind}): non-finite (NaN/Inf) values in {len(bad)} backbone tensors: "
                              f"{_shorten(bad)}; fix: use an earlier checkpoint from before training diverged")

    ordered: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    filled = []
    for k in reference:  # torchvision order
        if k in picked:
            ordered[k] = picked[k]
        else:
            ordered[k] = torch.tensor(0, dtype=torch.long)
            filled.append(k)
    return BackboneWeights(state_dict=ordered, kind=kind, arch=arch, small_stem=small_stem, skipped=skipped,
                           source=source, prefix=prefix, filled=filled)


def _all_finite(t: torch.Tensor) -> bool:
    """min and max are finite iff every value is (NaN propagates); one pass, ~2x faster than isfinite().all()."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _infer_arch(sd: Mapping[str, torch.Tensor], source: str) -> tuple[str, bool]:
    """The torchvision arch whose key set is closest to ``sd``'s (block type + blocks per stage)."""
    conv1 = sd.get("conv1.weight")
    small_stem = conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 3
    bottleneck = any(k.endswith(".conv3.weight") for k in sd)
    candidates = [a for a in FEATURE_DIMS if (a in ("resnet50", "resnet101")) == bottleneck]
    if not candidates:  # pragma: no cover - FEATURE_DIMS always holds both families
        raise CheckpointError(f"{source}: no supported ResNet matches these keys")

    def distance(arch: str) -> int:
        ref = _reference_shapes(arch, small_stem)
        return sum(k not in sd for k in ref if not k.endswith(_OPTIONAL)) + sum(k not in ref for k in sd)

    return min(candidates, key=distance), small_stem


_REF_CACHE: dict[tuple[str, bool], "OrderedDict[str, torch.Size]"] = {}


def _reference_shapes(arch: str, small_stem: bool) -> "OrderedDict[str, torch.Size]":
    """Key -> shape of build_resnet(arch)'s state_dict, built on the meta device (no memory, no init cost)."""
    if (arch, small_stem) not in _REF_CACHE:
        with torch.device("meta"):
            model = build_resnet(arch, small_stem=small_stem, zero_init_residual=False)
        _REF_CACHE[(arch, small_stem)] = OrderedDict((k, v.shape) for k, v in model.state_dict().items())
    return _REF_CACHE[(arch, small_stem)]


def _group_keys(missing: list[str], reference: Iterable[str], limit: int = 12) -> str:
    """Compresses a missing-key list: 'layer4.*' when a whole stage is missing, 'layer3.5.*' for a block."""
    reference = [k for k in reference if not k.endswith(_OPTIONAL)]
    missing_set = set(missing)
    out: list[str] = []
    done: set[str] = set()
    for k in missing:
        if k in done:
            continue
        parts = k.split(".")
        for depth in (1, 2):
            group = ".".join(parts[:depth]) + "."
            members = [r for r in reference if r.startswith(group)]
            if len(parts) > depth and members and all(m in missing_set for m in members):
                out.append(f"{group}* ({len(members)} tensors)")
                done.update(members)
                break
        else:
            out.append(k)
            done.add(k)
    return _shorten(out, limit)


def _shorten(items: list[str], limit: int = 12) -> str:
    s = ", ".join(items[:limit])
    return s + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------------------
# loading


def load_backbone_into(model: nn.Module, weights: BackboneWeights | Mapping[str, torch.Tensor], assign: bool = False,
                       source: str | None = None) -> nn.Module:
    """The one strict loader: ``weights`` (a ``BackboneWeights`` or a backbone state_dict) into a
    ``common.resnet.build_resnet`` model, checking every key.

    Every backbone key of the model must be in the weights, the weights may hold nothing the model lacks
    and no classifier (``fc.*``: a backbone checkpoint never has one; the model's own ``fc``, an Identity
    or a freshly initialised classifier, stays as it is); shapes must agree. Anything else raises
    CheckpointError naming the keys and the fix.
    assign: use the weights' tensors instead of copying (for a model built on the meta device; the model
    then shares storage with ``weights``).
    """
    if isinstance(weights, BackboneWeights):
        state, what = weights.state_dict, (f"the weights ({weights.arch}{', small stem' if weights.small_stem else ''}"
                                           f", from {weights.source})")
        fix = f"build the model with build_resnet({weights.arch!r}, small_stem={weights.small_stem})"
    else:
        state, what = weights, f"the weights{' from ' + source if source else ''}"
        fix = "pass a checkpoint of the same architecture (intl-convert --check shows what a file holds)"
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in target or k.startswith("fc.")]
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and not k.startswith("fc.") and tuple(v.shape) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"backbone keys missing in the weights: {_shorten(missing)}")
        if unexpected:
            parts.append(f"keys the backbone does not have (a classifier's fc.* included): {_shorten(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch: {_shorten(wrong)}")
        raise CheckpointError(f"{what} do not fit the model: {'; '.join(parts)}; fix: {fix}")
    result = model.load_state_dict(state, strict=False, assign=assign)
    left = [k for k in result.missing_keys if not k.startswith("fc.")]
    if left or result.unexpected_keys:  # cannot happen after the checks above; never ignore the result
        raise CheckpointError(f"loading left missing={left} unexpected={result.unexpected_keys}")
    return model


def build_backbone_from(weights: BackboneWeights) -> nn.Module:
    """``build_resnet`` with the weights' arch and stem, weights loaded (strictly checked)."""
    return load_backbone_into(build_resnet(weights.arch, small_stem=weights.small_stem), weights)
