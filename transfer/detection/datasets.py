"""Dataset registration for detection transfer, and a file check the launcher runs before queueing.

Three kinds of dataset names may appear in ``DATASETS.TRAIN`` / ``DATASETS.TEST``:

- COCO 2017 (``coco_2017_train``, ``coco_2017_val``, ...) and VOC (``voc_2007_trainval``,
  ``voc_2012_trainval``, ``voc_2007_test``, ...), found under a data root in detectron2's standard
  layout (``coco/train2017``, ``coco/annotations/instances_*2017.json``, ``VOC2007/``, ``VOC2012/``).
  The root is ``INTL.DATA_ROOT``, else ``$DETECTRON2_DATASETS``, else ``./datasets``.
- any COCO-json set listed in ``INTL.COCO_JSON_SETS`` as ``[name, json_file, image_root]`` (the embedded
  synthetic set is one); relative paths are taken from the current directory, else the repository root.
- any other name already in detectron2's DatasetCatalog (used as it is; its files are not checked).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.pascal_voc import register_pascal_voc

from transfer.detection.config import DetectionSetupError

REPO_ROOT = Path(__file__).resolve().parents[2]
_VOC_NAME = re.compile(r"^voc_(2007|2012)_(train|val|trainval|test)$")


class DatasetFilesError(DetectionSetupError):
    """Files a dataset needs are missing; raised before any job is queued."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # "coco_json" | "coco_builtin" | "voc" | "catalog"
    image_root: Path | None = None
    json_file: Path | None = None
    voc_dir: Path | None = None
    voc_split: str = ""
    voc_year: int = 0

    def required_paths(self) -> list[Path]:
        if self.kind in ("coco_json", "coco_builtin"):
            return [self.json_file, self.image_root]
        if self.kind == "voc":
            return [self.voc_dir / "ImageSets" / "Main" / f"{self.voc_split}.txt",
                    self.voc_dir / "Annotations", self.voc_dir / "JPEGImages"]
        return []


def data_root(cfg) -> Path:
    root = cfg.INTL.DATA_ROOT or os.environ.get("DETECTRON2_DATASETS", "") or "datasets"
    return Path(os.path.expanduser(root))


def _json_sets(cfg) -> dict[str, tuple[Path, Path]]:
    sets = {}
    for entry in cfg.INTL.COCO_JSON_SETS:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise DetectionSetupError(f"INTL.COCO_JSON_SETS entries must be [name, json_file, image_root], "
                                      f"got {entry!r}; fix: e.g. INTL.COCO_JSON_SETS "
                                      "\"[['shapes_train', 'd/instances_train.json', 'd']]\"")
        name, json_file, image_root = (str(x) for x in entry)
        sets[name] = (_resolve(json_file), _resolve(image_root))
    return sets


def _resolve(path: str) -> Path:
    """Absolute path; a relative one is taken from the current directory, else from the repository root
    (so configs/detection/synthetic_R_50_C4.yaml's data/synthetic/... works from anywhere)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p.absolute()
    return REPO_ROOT / p


def dataset_specs(cfg) -> list[DatasetSpec]:
    """Resolves every dataset name the config trains or tests on; unknown names raise."""
    json_sets = _json_sets(cfg)
    root = data_root(cfg).absolute()
    coco_builtin = _PREDEFINED_SPLITS_COCO["coco"]
    names = list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))
    specs, unknown = [], []
    for name in names:
        if name in json_sets:
            json_file, image_root = json_sets[name]
            specs.append(DatasetSpec(name, "coco_json", image_root=image_root, json_file=json_file))
        elif name in coco_builtin:
            image_dir, json_file = coco_builtin[name]
            specs.append(DatasetSpec(name, "coco_builtin", image_root=root / image_dir, json_file=root / json_file))
        elif (m := _VOC_NAME.match(name)) and not (m.group(1) == "2012" and m.group(2) == "test"):
            year = int(m.group(1))
            specs.append(DatasetSpec(name, "voc", voc_dir=root / f"VOC{year}", voc_split=m.group(2), voc_year=year))
        elif name in DatasetCatalog.list():
            specs.append(DatasetSpec(name, "catalog"))
        else:
            unknown.append(name)
    if unknown:
        raise DetectionSetupError(
            f"unknown dataset name(s) {unknown}; fix: use coco_2017_train/coco_2017_val, voc_2007_trainval, "
            "voc_2012_trainval, voc_2007_test, or list the set in INTL.COCO_JSON_SETS as [name, json_file, image_root]")
    return specs


def check_dataset_files(cfg) -> list[Path]:
    """Raises DatasetFilesError naming every missing file or folder; returns the paths checked."""
    checked, missing = [], []
    for spec in dataset_specs(cfg):
        for path in spec.required_paths():
            checked.append(path)
            if not path.exists():
                missing.append(f"{spec.name}: {path}")
    if missing:
        root = data_root(cfg)
        raise DatasetFilesError(
            "detection data missing:\n  " + "\n  ".join(missing) +
            f"\nfix: put COCO 2017 / VOC under the data root in detectron2's layout (now {root}; set INTL.DATA_ROOT "
            "or $DETECTRON2_DATASETS), or correct the paths in INTL.COCO_JSON_SETS "
            "(the embedded set: python -m common.synthetic --out data/synthetic)")
    return checked


def _replace(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_datasets(cfg) -> list[DatasetSpec]:
    """(Re-)registers every dataset of the config under its resolved paths; returns the specs."""
    specs = dataset_specs(cfg)
    for spec in specs:
        if spec.kind == "catalog":
            continue
        _replace(spec.name)
        if spec.kind == "coco_json":
            register_coco_instances(spec.name, {}, str(spec.json_file), str(spec.image_root))
        elif spec.kind == "coco_builtin":
            register_coco_instances(spec.name, _get_builtin_metadata("coco"), str(spec.json_file), str(spec.image_root))
        else:
            register_pascal_voc(spec.name, str(spec.voc_dir), spec.voc_split, spec.voc_year)
            MetadataCatalog.get(spec.name).evaluator_type = "pascal_voc"
    return specs
