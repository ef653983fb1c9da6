"""Checks what initial weights give the C4 Mask R-CNN, before the first iteration.

An SSL backbone converted by ``intl-convert`` (a detectron2 ``.pkl`` with ``matching_heuristics``)
covers the stem, res2-res4 (``backbone.*``) and res5 (``roi_heads.res5.*``). Everything else is new
and expected to start from scratch: the RPN, the box and mask predictors, the mask head's deconv and
the extra norm after res5. A backbone key that the weights do not provide (or provide with another
shape) means the wrong file: the run stops with WeightsMismatchError instead of silently training a
partly random backbone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from detectron2.checkpoint import DetectionCheckpointer

from transfer.detection.config import DetectionSetupError
from transfer.detection.roi_heads import EXTRA_NORM_NAME

logger = logging.getLogger("transfer.detection")

BACKBONE_PREFIXES = ("backbone.", "roi_heads.res5.")
EXTRA_NORM_PREFIX = f"roi_heads.res5.{EXTRA_NORM_NAME}."
# BN's batch counter is not a weight: a converted file need not have it.
IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightsMismatchError(DetectionSetupError):
    """The initial weights lack backbone keys (or have them with other shapes)."""


def is_backbone_key(key: str) -> bool:
    return key.startswith(BACKBONE_PREFIXES) and not key.startswith(EXTRA_NORM_PREFIX)


@dataclass
class WeightsReport:
    loaded: int = 0
    expected_new: list[str] = field(default_factory=list)
    missing_backbone: list[str] = field(default_factory=list)
    wrong_shape_backbone: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    wrong_shape_other: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing_backbone and not self.wrong_shape_backbone


def classify_incompatible(model_keys, missing_keys, unexpected_keys, incorrect_shapes) -> WeightsReport:
    """Sorts the keys a load did not fill into expected-new and backbone problems."""
    report = WeightsReport()
    wrong = {k for k, _, _ in incorrect_shapes}
    missing = {k for k in missing_keys if not k.endswith(IGNORED_SUFFIXES)} | wrong
    for k in missing_keys:
        if k.endswith(IGNORED_SUFFIXES) or k in wrong:
            continue
        (report.missing_backbone if is_backbone_key(k) else report.expected_new).append(k)
    for k, shape_ckpt, shape_model in incorrect_shapes:
        (report.wrong_shape_backbone if is_backbone_key(k) else report.wrong_shape_other).append(
            (k, tuple(shape_ckpt), tuple(shape_model)))
    report.unused = sorted(unexpected_keys)
    report.loaded = sum(1 for k in model_keys if k not in missing and not k.endswith(IGNORED_SUFFIXES))
    return report


def _group(keys: list[str]) -> list[str]:
    """Compresses key lists to module prefixes for the log (``roi_heads.box_predictor.{cls_score,bbox_pred}``)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        mod, _, leaf = k.rpartition(".")
        groups.setdefault(mod, []).append(leaf)
    return [f"{m}.{{{','.join(sorted(v))}}}" for m, v in sorted(groups.items())]


class WeightsFileError(DetectionSetupError):
    """MODEL.WEIGHTS (or a checkpoint to resume) is not a weights file detectron2 can read."""


class CheckedDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose report on incompatible keys tells expected-new from backbone mismatch, and
    which names an unreadable file (garbage, torn, not a pickle) instead of raising pickle's error."""

    last_report: WeightsReport | None = None

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a weights file"
            raise WeightsFileError(
                f"{filename} could not be read as detectron2 weights ({type(e).__name__}: {e}); fix: pass as "
                "MODEL.WEIGHTS a file written by `intl-convert CHECKPOINT OUT.pkl` (or MODEL.WEIGHTS \"\" for "
                "random init); if it is this run's own model_*.pth, delete it (and last_checkpoint) to resume "
                "from the one before") from e

    def _log_incompatible_keys(self, incompatible) -> None:
        report = classify_incompatible(self.model.state_dict().keys(), incompatible.missing_keys,
                                       incompatible.unexpected_keys, incompatible.incorrect_shapes)
        self.last_report = report
        if not report.ok:
            lines = [f"missing from the weights: {k}" for k in report.missing_backbone[:20]]
            lines += [f"shape {s} in the weights, {m} in the model: {k}"
                      for k, s, m in report.wrong_shape_backbone[:20]]
            more = len(report.missing_backbone) + len(report.wrong_shape_backbone) - len(lines)
            raise WeightsMismatchError(
                f"the initial weights do not fit the backbone: {len(report.missing_backbone)} backbone key(s) missing, "
                f"{len(report.wrong_shape_backbone)} with another shape\n  " + "\n  ".join(lines) +
                (f"\n  ... and {more} more" if more > 0 else "") +
                "\nfix: pass a ResNet-50 converted with `intl-convert CHECKPOINT OUT.pkl` (detectron2 names, "
                "matching_heuristics) as MODEL.WEIGHTS, or MODEL.WEIGHTS \"\" for random init")
        logger.info("weights: %d tensors loaded into the model; %d new tensors start from scratch as expected "
                    "for an SSL backbone (RPN, box/mask predictors, mask deconv, res5 extra norm):\n  %s",
                    report.loaded, len(report.expected_new), "\n  ".join(_group(report.expected_new)) or "(none)")
        for k, s, m in report.wrong_shape_other:
            logger.info("weights: head tensor %s has shape %s in the file, %s in the model: starts from scratch",
                        k, s, m)
        if report.unused:
            logger.info("weights: %d tensors in the file are not used by the model: %s",
                        len(report.unused), ", ".join(_group(report.unused)))
