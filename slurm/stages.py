"""The stage registry: stage name -> entry point, config, the inputs checked before queueing.

Stage configs are composed by ``common.config.compose_config`` (``compose_stage_config`` looks the stage
up here first, so that extra stages compose from their own folder).

Extra stages (tests, plugins) are registered without touching this file through the environment variable
``INTL_SUBMIT_EXTRA_STAGES``: ``name=module:function@/abs/config/dir`` entries separated by ``;``. The
config dir must hold ``<name>.yaml`` with the usual top-level keys ``name``, ``run_dir``, ``seed``;
``@detectron2`` instead of a folder registers a detection-like stage (``function(config_file, opts,
output_dir, resume=True)``, optional ``preflight(config_file, opts)`` in the same module).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from common.checkpoint import LAST_NAME
from common.config import compose_config

from .errors import SubmitError

EXTRA_STAGES_ENV = "INTL_SUBMIT_EXTRA_STAGES"

HYDRA = "hydra"
DETECTION = "detection"


@dataclass(frozen=True)
class StageSpec:
    """What the launcher needs to know about a stage."""

    name: str
    module: str                      # imported lazily, inside the job
    function: str = "run"            # run(cfg) for Hydra stages; run_task(...) for detection
    kind: str = HYDRA                # HYDRA (configs/<name>.yaml) or DETECTION (detectron2 yacs YAML)
    config_name: str | None = None   # Hydra config name (default: the stage name)
    config_dir: str | None = None    # only for extra stages; default: the repository's configs/
    # Dotted config keys naming inputs that must exist before anything is queued (None/"" = unused).
    input_paths: tuple[str, ...] = field(default_factory=tuple)
    # Optional up-front check in the stage module, called by the launcher before queueing when present:
    # Hydra stages validate_config(cfg, world_size=N) (raises ValueError naming key and fix),
    # detection preflight(config_file, opts).
    preflight: str = "validate_config"
    # The pretraining-format checkpoint (common.checkpoint) the stage resumes from, relative to run_dir;
    # the launcher reads it before queueing a resume, so an unreadable one fails now, not at job start.
    resume_checkpoint: str | None = None

    @property
    def hydra_config_name(self) -> str:
        return self.config_name or self.name

    def is_available(self) -> bool:
        try:  # find_spec imports the parent packages, not the module itself
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def preflight_function(self):
        """The stage's up-front check, or None when its module has none."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as e:
            raise SubmitError(f"stage {self.name!r}: its module {self.module} fails to import ({e}); fix: check the "
                              "installation (make venv) or the module") from None
        return getattr(module, self.preflight, None)

    def load_entry_point(self):
        """Imports the stage module and returns its entry point (called inside the job)."""
        module = importlib.import_module(self.module)
        try:
            return getattr(module, self.function)
        except AttributeError:
            raise SubmitError(f"stage {self.name!r}: module {self.module} has no function {self.function}(); "
                              "fix: update the stage module to the ARCHITECTURE.md entry point") from None


# The product stages (ARCHITECTURE.md, "Stage entry points"). input_paths lists the config keys that
# name data or weights the stage reads; the launcher checks they exist before queueing anything.
STAGES: dict[str, StageSpec] = {
    "pretrain": StageSpec("pretrain", "pretrain.train", input_paths=("data.root", "data.train_dir"),
                          preflight="preflight", resume_checkpoint=LAST_NAME),
    "linear": StageSpec("linear", "transfer.linear",
                        input_paths=("data.root", "data.train_dir", "data.val_dir", "pretrained", "weights")),
    "semi": StageSpec("semi", "transfer.semi",
                      input_paths=("data.root", "data.train_dir", "data.val_dir", "pretrained", "weights")),
    # knn: its data folders are checked by its validate_config (not with knn.features, a dump instead of images)
    "knn": StageSpec("knn", "transfer.knn", input_paths=("knn.features", "pretrained", "weights")),
    "embed": StageSpec("embed", "transfer.embed",
                       input_paths=("data.root", "data.train_dir", "data.val_dir", "pretrained", "weights")),
    "detection": StageSpec("detection", "transfer.detection.train_net", function="run_task", kind=DETECTION,
                           preflight="preflight"),
    # Not a pipeline stage: the set-up check before a long run (ranks meet, collectives, data, disk).
    "doctor": StageSpec("doctor", "slurm.doctor", input_paths=("data.root",)),
}


def _extra_stages() -> dict[str, StageSpec]:
    text = os.environ.get(EXTRA_STAGES_ENV, "").strip()
    stages: dict[str, StageSpec] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        try:
            name, rest = entry.split("=", 1)
            target, cfg_dir = rest.split("@", 1)
            module, function = target.split(":", 1)
        except ValueError:
            raise SubmitError(f"{EXTRA_STAGES_ENV} entry {entry!r} is malformed; "
                              "fix: use name=module:function@/abs/config/dir") from None
        if cfg_dir.strip() != "detectron2" and not Path(cfg_dir.strip()).is_absolute():
            raise SubmitError(f"{EXTRA_STAGES_ENV} entry {entry!r}: the config dir must be an absolute path")
        name, module, function, cfg_dir = name.strip(), module.strip(), function.strip(), cfg_dir.strip()
        if cfg_dir == "detectron2":  # a detection-like stage: run_task(config_file, opts, output_dir, resume)
            stages[name] = StageSpec(name, module, function, kind=DETECTION, preflight="preflight")
            continue
        stages[name] = StageSpec(name, module, function, config_dir=cfg_dir)
    return stages


def all_stages() -> dict[str, StageSpec]:
    return {**STAGES, **_extra_stages()}


def get_stage(name: str) -> StageSpec:
    """The registered stage, or a SubmitError naming the valid stages / saying the stage is not built yet."""
    stages = all_stages()
    if name not in stages:
        raise SubmitError(f"unknown stage {name!r}; fix: use one of {', '.join(sorted(stages))}")
    spec = stages[name]
    if not spec.is_available():
        raise SubmitError(f"stage {name!r} is not available in this installation: its module {spec.module} "
                          "does not exist yet (the stage has not landed); nothing was submitted")
    return spec


def compose_stage_config(stage: str, overrides: Sequence[str] = ()):
    """The registered Hydra stage's config, composed by ``common.config.compose_config`` (extra stages
    from their own config folder)."""
    spec = all_stages().get(stage)
    if spec is None:
        raise SubmitError(f"unknown stage {stage!r}; fix: use one of {', '.join(sorted(all_stages()))}")
    if spec.kind != HYDRA:
        raise SubmitError(f"stage {stage!r} uses a detectron2 config file, not a Hydra config; "
                          "fix: pass --config-file F and KEY VALUE overrides")
    return compose_config(stage, overrides, directory=spec.config_dir, config_name=spec.hydra_config_name)
