"""Read any supported checkpoint into a torchvision ResNet state_dict (the one shared checkpoint reader).

Recognised inputs: the layout is detected from the checkpoint's structure (its top-level entries and key
prefixes, as each project's save call writes them), never from the file name. ``KINDS`` maps each kind to
where its online and momentum encoders are:

==================  ===================================================================  =====================
kind                what the project saves (the save call)                               momentum encoder
==================  ===================================================================  =====================
``intl-pretrain``   this project: ``{"format": "intl-pretrain", "model": {backbone.*}}``  ``ema_model``
``official-intl``   INTL main.py: ``{epoch, arch, state_dict: DDP model, optimizer}``,   ``module.momentum_
                    ``module.backbone.*`` beside ``module.projection.*``                  backbone.*``
``solo-learn``      Lightning ``trainer.save_checkpoint``: ``{pytorch-lightning_version,   ``momentum_
                    state_dict: {backbone.*, projector.*, classifier.*}, ...}``          backbone.*``
``barlow-twins``    barlowtwins main.py checkpoint.pth: ``{epoch, model: DDP model,      none
                    optimizer}``, ``module.backbone.*``, ``module.projector.*``, ``module.bn.*``
``dino``            dino main_dino.py: ``{student, teacher, optimizer, epoch, args,      ``teacher``
                    dino_loss}``, ``module.backbone.*`` / ``module.head.*``              (DINO evaluates it)
``moco``            MoCo v1/v2: ``state_dict`` ``module.encoder_q.*``                     ``module.encoder_k.*``
``moco-v3``         moco-v3 main_moco.py: ``{epoch, arch, state_dict, optimizer,          ``module.momentum_
                    scaler}``, ``module.base_encoder.*`` (fc = its projector)            encoder.*``
``simsiam``         simsiam main_simsiam.py: ``state_dict`` ``module.encoder.*`` (fc =     none
                    its projector) + ``module.predictor.*``
``vissl``           VISSL: ``classy_state_dict.base_model.model.trunk``                  ``classy_state_dict.
                    ``_feature_blocks.*`` (heads beside it)                              ema_model`` (if any)
``timm``            timm train.py (CheckpointSaver): ``{state_dict, arch, version,       ``state_dict_ema``
                    optimizer, ...}`` with torchvision's ResNet key names
``torchvision``     a plain ResNet state_dict (torchvision, Barlow Twins' resnet50.pth,   none
                    a timm resnet's state_dict: the same key names)
``backbone``        a ``backbone.*`` state_dict of no project above                      ``momentum_backbone.*``
``custom``          ``checkpoint_key`` (a dotted path into the file) and/or ``prefix``   you pick it
==================  ===================================================================  =====================

A leading ``module.`` (DDP) is accepted everywhere. The result always holds exactly the tensors of the
inferred torchvision ResNet (conv, BN weight/bias/running stats; ``num_batches_tracked`` filled with 0
when the source lacks it; floating tensors as float32) and never ``fc.*``; every other input key is listed
in ``skipped``. A pretraining checkpoint's tensors must also agree with its own ``config.model``.
Anything else (not a checkpoint, empty, unknown layout, a missing layer, wrong shapes, another architecture
such as a deep-stem ResNet, NaN/Inf) raises :class:`common.checkpoint.CheckpointError` naming the problem,
what was found and the fix (``checkpoint_key`` / ``prefix`` for a layout not listed).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from common.checkpoint import BACKBONE_PREFIX, CheckpointError, is_pretrain_checkpoint
from common.resnet import BOTTLENECK_ARCHS, FEATURE_DIMS, build_resnet

KINDS = {  # kind -> what it is (printed by intl-convert and the evaluations)
    "intl-pretrain": "this project's pretraining checkpoint",
    "official-intl": "official INTL checkpoint (main.py)",
    "solo-learn": "solo-learn (PyTorch Lightning) checkpoint",
    "barlow-twins": "Barlow Twins checkpoint.pth (main.py)",
    "dino": "DINO checkpoint (main_dino.py)",
    "moco": "MoCo v1/v2 checkpoint",
    "moco-v3": "MoCo v3 checkpoint (main_moco.py)",
    "simsiam": "SimSiam checkpoint (main_simsiam.py)",
    "vissl": "VISSL checkpoint (classy_state_dict trunk)",
    "timm": "timm training checkpoint (train.py)",
    "torchvision": "plain ResNet state_dict (torchvision / timm key names)",
    "backbone": "state_dict with a 'backbone.' prefix of no recognised project",
    "custom": "the state_dict picked by checkpoint_key / prefix",
}
ENCODERS = ("online", "momentum")
# Checkpoints a run resumes from or a user keeps (not a bare backbone): intl-convert never overwrites one.
TRAINING_KINDS = ("intl-pretrain", "official-intl", "solo-learn", "barlow-twins", "dino", "moco", "moco-v3",
                  "simsiam", "vissl", "timm", "backbone")

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
    where: str = ""  # the entry of the file it was read from ("state_dict", "teacher", ...; "" = top level)
    filled: list[str] = field(default_factory=list)  # num_batches_tracked buffers absent in the source
    notes: list[str] = field(default_factory=list)  # what the user should know about this layout
    # What the weights were read from: path, sha256 of the file's bytes, kind, encoder, and for a pretraining
    # checkpoint its step, epoch and ``finished`` flag (None for other kinds). See ``source_identity``.
    identity: dict = field(default_factory=dict)

    @property
    def num_tensors(self) -> int:
        return len(self.state_dict)

    def summary(self) -> str:
        where = f"{self.where + ' ' if self.where else ''}{self.prefix!r}" if self.prefix or self.where else "top level"
        notes = "".join(f"; note: {n}" for n in self.notes)
        return (f"{self.source}: kind={self.kind} ({KINDS.get(self.kind, '?')}), encoder={self.encoder}, "
                f"arch={self.arch}{' (small stem)' if self.small_stem else ''}, {self.num_tensors} backbone tensors "
                f"read from {where}, {len(self.skipped)} input keys skipped{notes}")


# ----------------------------------------------------------------------------------------------------------
# reading


def read_backbone_weights(path_or_obj: str | os.PathLike | Mapping[str, Any], encoder: str = "online",
                          checkpoint_key: str | None = None, prefix: str | None = None) -> BackboneWeights:
    """Reads a checkpoint file (or an already loaded object) and returns its backbone's weights.

    encoder: "online" (the trained network; DINO's student) or "momentum" (the EMA / key / teacher encoder,
    when the layout has one). checkpoint_key: a dotted path to the state_dict inside the file (``teacher``,
    ``classy_state_dict.base_model.model.trunk``), as DINO's ``--checkpoint_key``; prefix: the key prefix of
    the backbone inside it (``module.backbone.``); either one makes the kind ``custom`` and skips detection.
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
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a checkpoint dict; fix: pass a checkpoint "
                              f"of one of the recognised layouts ({', '.join(KINDS)}) or a ResNet state_dict")

    if checkpoint_key is not None or prefix is not None:
        layout = _custom_layout(obj, checkpoint_key, prefix, encoder, source)
    else:
        layout = _detect_layout(obj, source)
    picked = layout.momentum if encoder == "momentum" else layout.online
    if picked is None:
        what = ("a pretraining checkpoint without a momentum (EMA) encoder (ema_model is empty)"
                if layout.kind == "intl-pretrain" else f"a {KINDS[layout.kind]} ({layout.kind}), which has no momentum "
                                                        "encoder")
        raise CheckpointError(f"{source} is {what}; fix: use --encoder online (encoder=online)"
                              + (", or pretrain with the EMA variant" if layout.kind == "intl-pretrain" else ""))
    where, state, key_prefix = picked
    weights = _extract(state, key_prefix, layout.kind, source)
    if layout.kind == "intl-pretrain":
        _check_against_config(weights, obj.get("config"), source)
    weights.encoder, weights.where = encoder, where
    for other_where, other_state in layout.others(where):
        weights.skipped += [f"{other_where}.{k}" for k in other_state]
    weights.notes = list(layout.notes)
    if layout.kind == "dino":
        weights.notes.append("DINO's own evaluations use the teacher (--encoder momentum / encoder=momentum)"
                             if encoder == "online" else "the teacher, as DINO's own evaluations use")
    if layout.kind == "solo-learn" and weights.small_stem:
        weights.notes.append("solo-learn's CIFAR stem pads conv1 by 2 pixels, this project's by 1: the weights load, "
                             "but 32-px features differ slightly from solo-learn's")
    pretrain = layout.kind == "intl-pretrain"
    weights.identity = {
        "path": str(Path(source).resolve()) if sha256 else source, "sha256": sha256, "kind": layout.kind,
        "encoder": encoder, "checkpoint_key": checkpoint_key, "prefix": prefix,
        "step": obj.get("step") if pretrain else None, "epoch": obj.get("epoch") if pretrain else None,
        "finished": bool(obj.get("finished", False)) if pretrain else None,
        "snapshot": bool(obj.get("snapshot", False)) if pretrain else None}
    return weights


@dataclass
class _Layout:
    """Where a checkpoint keeps its encoders: (entry name, state_dict, key prefix) for each, or None."""

    kind: str
    online: tuple[str, Mapping[str, Any], str]
    momentum: tuple[str, Mapping[str, Any], str] | None = None
    notes: tuple[str, ...] = ()

    def others(self, picked_where: str) -> list[tuple[str, Mapping[str, Any]]]:
        """The other encoder's state_dict when it is a separate entry (its keys are listed as skipped)."""
        out = []
        for enc in (self.online, self.momentum):
            if enc is not None and enc[0] != picked_where and isinstance(enc[1], Mapping):
                out.append((enc[0], enc[1]))
        return out


def _keys(state: Mapping[str, Any]) -> list[str]:
    return list(_strip_module(state))


def _has(state: Mapping[str, Any], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in _keys(state))


def _plain_resnet(state: Mapping[str, Any]) -> bool:
    return any(k in ("conv1.weight", "layer1.0.conv1.weight", "conv1.0.weight") for k in _keys(state))


def _detect_layout(obj: Mapping, source: str) -> _Layout:
    """The layout of ``obj`` from its structure (see the module docstring's table)."""
    if is_pretrain_checkpoint(obj):
        online, ema = obj.get("model"), obj.get("ema_model")
        if not isinstance(online, Mapping):
            raise CheckpointError(f"{source} is a pretraining checkpoint without a 'model' state_dict; "
                                  "fix: pass a checkpoint written by the pretraining engine")
        return _Layout("intl-pretrain", ("model", online, BACKBONE_PREFIX),
                       ("ema_model", ema, BACKBONE_PREFIX) if ema else None)
    if isinstance(obj.get("classy_state_dict"), Mapping):  # VISSL
        csd = obj["classy_state_dict"]
        trunk = _dig(csd, ("base_model", "model", "trunk"), source, "classy_state_dict")
        ema = csd.get("ema_model")
        ema_trunk = ema.get("model", {}).get("trunk") if isinstance(ema, Mapping) else None
        return _Layout("vissl", ("classy_state_dict.base_model.model.trunk", trunk, _resnet_prefix(trunk, source)),
                       ("classy_state_dict.ema_model.model.trunk", ema_trunk, _resnet_prefix(ema_trunk, source))
                       if isinstance(ema_trunk, Mapping) and ema_trunk else None)
    if isinstance(obj.get("student"), Mapping) and isinstance(obj.get("teacher"), Mapping):  # DINO
        student, teacher = obj["student"], obj["teacher"]
        return _Layout("dino", ("student", student, "backbone."), ("teacher", teacher, "backbone."))
    where, state = _find_state_dict(obj, source)
    if _has(state, "encoder_q.", "encoder_k."):
        return _Layout("moco", (where, state, "encoder_q."), (where, state, "encoder_k."))
    if _has(state, "base_encoder.", "momentum_encoder."):
        return _Layout("moco-v3", (where, state, "base_encoder."), (where, state, "momentum_encoder."))
    if _has(state, "encoder.") and _has(state, "predictor."):
        return _Layout("simsiam", (where, state, "encoder."))
    if _has(state, "backbone."):
        momentum = (where, state, "momentum_backbone.") if _has(state, "momentum_backbone.") else None
        ddp = any(k.startswith("module.backbone.") for k in state)
        if "pytorch-lightning_version" in obj or (where == "state_dict" and not ddp and _has(state, "classifier.")):
            return _Layout("solo-learn", (where, state, "backbone."), momentum)
        if where == "model" and _has(state, "projector.") and _has(state, "bn."):
            return _Layout("barlow-twins", (where, state, "backbone."))
        if where == "state_dict" and ddp and (_has(state, "projection.") or "arch" in obj):
            return _Layout("official-intl", (where, state, "backbone."), momentum)
        return _Layout("backbone", (where, state, "backbone."), momentum,
                       notes=(f"its layout is none of the recognised projects' (found {_describe_prefixes(state)}); "
                              "the 'backbone.' tensors were read",))
    if _plain_resnet(state):
        if where == "state_dict" and "version" in obj and isinstance(obj.get("arch"), str):
            ema = obj.get("state_dict_ema")
            momentum = ("state_dict_ema", ema, "") if isinstance(ema, Mapping) else None
            return _Layout("timm", (where, state, ""), momentum)
        return _Layout("torchvision", (where, state, ""))
    if _has(state, "_feature_blocks."):  # a VISSL trunk saved on its own
        return _Layout("vissl", (where, state, _resnet_prefix(state, source)))
    raise CheckpointError(f"{source} has no recognisable ResNet backbone; {_found(obj, state)}; recognised layouts: "
                          f"{', '.join(KINDS)} (see intl-convert --help); fix: name the state_dict and the backbone's "
                          "key prefix yourself: --checkpoint-key <entry> --prefix <prefix> (evaluations: "
                          "checkpoint_key=..., checkpoint_prefix=...), e.g. --checkpoint-key teacher "
                          "--prefix backbone.")


def _found(obj: Mapping, state: Mapping[str, Any]) -> str:
    top = ", ".join(f"{k!r}" for k in list(obj)[:12])
    return f"top-level entries: {top}; key prefixes found: {_describe_prefixes(state)}"


def _dig(obj: Any, path: Sequence[str], source: str, start: str = "") -> Mapping[str, Any]:
    """``obj[path[0]][path[1]]...``, a CheckpointError naming the entries where it stops."""
    here, done = obj, start
    for part in path:
        if not isinstance(here, Mapping) or part not in here:
            keys = [str(k) for k in list(here)[:20]] if isinstance(here, Mapping) else []
            example = ".".join(filter(None, [done, keys[0] if keys else "state_dict"]))
            raise CheckpointError(f"{source}: no entry {part!r} under {done or 'the top level'} (entries there: "
                                  f"{keys or type(here).__name__}); fix: --checkpoint-key with a path that exists, "
                                  f"e.g. {example}")
        here, done = here[part], f"{done}.{part}" if done else part
    if not isinstance(here, Mapping):
        raise CheckpointError(f"{source}: {done} is a {type(here).__name__}, not a state_dict; fix: a --checkpoint-key "
                              "that names a dict of tensors")
    return here


def _resnet_prefix(state: Mapping[str, Any] | None, source: str, candidates_only: bool = False):
    """The key prefix in front of a torchvision ResNet in ``state`` (``''``, ``_feature_blocks.``, ...): the part
    before ``conv1.weight`` of a key whose ``layer1.0.conv1.weight`` sibling exists. Several: CheckpointError."""
    if not state:
        return ""
    keys = set(_keys(state))
    found = sorted({k[: -len("conv1.weight")] for k in keys if k.endswith("conv1.weight")
                    and k[: -len("conv1.weight")] + "layer1.0.conv1.weight" in keys})
    if candidates_only:
        return found
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{source}: no ResNet (no '<prefix>conv1.weight' with '<prefix>layer1.0.conv1.weight' "
                              f"beside it); key prefixes found: {_describe_prefixes(state)}; fix: --prefix <prefix>")
    raise CheckpointError(f"{source}: {len(found)} ResNets in one state_dict (prefixes {found}); fix: choose one with "
                          f"--prefix, e.g. --prefix {found[0] or chr(39) * 2}")


def _custom_layout(obj: Mapping, checkpoint_key: str | None, prefix: str | None, encoder: str,
                   source: str) -> _Layout:
    """The state_dict at ``checkpoint_key`` (dotted; default: the one ``_find_state_dict`` finds) and the backbone
    under ``prefix`` (default: the only ResNet in it)."""
    if encoder != "online":
        raise CheckpointError("with --checkpoint-key / --prefix the entry and prefix you give pick the encoder; fix: "
                              "--encoder online and point them at the momentum encoder (e.g. --checkpoint-key teacher)")
    if checkpoint_key:
        where, state = checkpoint_key, _dig(obj, checkpoint_key.split("."), source)
    else:
        where, state = _find_state_dict(obj, source)
    if prefix is None:
        prefix = _resnet_prefix(state, source)
    stripped = prefix[len("module."):] if prefix.startswith("module.") else prefix
    if not _has(state, stripped):
        raise CheckpointError(f"{source}: no key of {where or 'the file'} starts with {prefix!r}; key prefixes found: "
                              f"{_describe_prefixes(state)}; fix: --prefix with one of them")
    return _Layout("custom", (where, state, stripped))


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


def _find_state_dict(obj: Mapping, source: str) -> tuple[str, Mapping[str, Any]]:
    """(entry, state_dict) inside a checkpoint: the ``state_dict``/``model``/``module`` entry, or the object itself."""
    for key in ("state_dict", "model", "module", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _looks_like_state_dict(inner):
            return key, inner
    if _looks_like_state_dict(obj):
        return "", obj
    if len(obj) == 0 or any(isinstance(obj.get(k), Mapping) and len(obj[k]) == 0 for k in ("state_dict", "model")):
        raise CheckpointError(f"{source} has an empty state_dict (no tensors at all); fix: pass the checkpoint "
                              "saved after training, not an empty or truncated one")
    found = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:12])
    raise CheckpointError(f"{source} holds no state_dict of tensors; top-level entries found: {found}; fix: pass a "
                          f"checkpoint of a recognised layout ({', '.join(KINDS)}), or name the entry holding the "
                          "state_dict with --checkpoint-key and, if needed, the backbone's key prefix with --prefix "
                          "(evaluations: checkpoint_key=..., checkpoint_prefix=...)")


def _looks_like_state_dict(d: Mapping) -> bool:
    return (len(d) > 0 and all(isinstance(k, str) for k in d)
            and sum(torch.is_tensor(v) for v in d.values()) >= len(d) / 2)


def _strip_module(state: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Removes one leading ``module.`` (DDP / DataParallel) from every key that has it."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


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

    if any(k.startswith("conv1.") and k != "conv1.weight" for k in picked):
        stem = _shorten([k for k in picked if k.startswith("conv1.")], 4)
        raise CheckpointError(f"{source} ({kind}) is a deep-stem ResNet (timm resnet*d / *c / *s / *e: conv1 is a "
                              f"stack of 3x3 convs, keys {stem}), not a torchvision ResNet; fix: pass a checkpoint of "
                              "a plain ResNet (timm resnet18/50 are torchvision-compatible)")
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
    candidates = [a for a in FEATURE_DIMS if (a in BOTTLENECK_ARCHS) == bottleneck]
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
