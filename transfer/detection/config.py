"""detectron2 (yacs) config for detection transfer: our extra keys, loading, and run-time adjustments.

The YAML files under ``configs/detection/`` hold the protocol as published. What depends on where a run
actually happens is decided here, at start, and printed:

- the norm layer: ``SyncBN`` in the config means "synchronised over all processes"; in one process
  that is plain ``BN`` (torch's SyncBatchNorm needs a process group), on CPU processes (gloo) it is
  detectron2's ``naiveSyncBN`` (torch's SyncBatchNorm is CUDA-only);
- batch scaling: a run with another ``SOLVER.IMS_PER_BATCH`` than ``INTL.REFERENCE_IMS_PER_BATCH``
  gets a linearly scaled ``BASE_LR`` and inversely scaled iteration counts (same number of epochs);
- mixed precision on CPU: ``SOLVER.AMP.ENABLED`` (a bf16 autocast on CPU) is turned off on a CPU without
  native bf16 instructions (avx512_bf16 / amx_bf16), where torch emulates bf16 and a step is many times
  slower than in float32 (measured on a 2-core AVX2 EPYC: 27.5 s vs 1.7 s per R50-C4 iteration).
"""

from __future__ import annotations

from pathlib import Path

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from common.config import config_dir
from common.errors import UserError

# The first key of configs/detection/Base-RCNN-C4-BN.yaml: plain detectron2 rejects it by this name.
MARKER_KEY = "REQUIRES_transfer_detection_train_net"


class DetectionSetupError(UserError, ValueError):
    """A problem the user can fix before training (config, data, weights); the message says how."""


def add_intl_config(cfg: CN) -> CN:
    """Adds our keys (``INTL.*``) to a detectron2 config, in the style of detectron2 projects' add_*_config."""
    # Marks a config as ours: plain detectron2 stops at this unknown key, whose name says where to go.
    cfg[MARKER_KEY] = False
    cfg.INTL = CN()
    # The global batch that SOLVER.BASE_LR / MAX_ITER / STEPS were written for; 0 = never rescale.
    cfg.INTL.REFERENCE_IMS_PER_BATCH = 0
    # Image root for the builtin COCO 2017 / VOC datasets (detectron2's layout: coco/train2017,
    # coco/annotations, VOC2007, VOC2012). "" = $DETECTRON2_DATASETS, else ./datasets.
    cfg.INTL.DATA_ROOT = ""
    # Extra COCO-json datasets: a list of [name, json_file, image_root]; relative paths are taken from
    # the current directory, else the repository root. The embedded synthetic set is registered this way.
    cfg.INTL.COCO_JSON_SETS = []
    # Periodic model_XXXXXXX.pth files kept (older ones deleted; model_final.pth always stays). A 1x run
    # checkpoints every 5000 iterations, about 280 MB each; 0 keeps them all.
    cfg.INTL.MAX_CHECKPOINTS_TO_KEEP = 2
    return cfg


def base_config() -> CN:
    cfg = get_cfg()
    add_intl_config(cfg)
    return cfg


def load_config(config_file: str | Path, opts: list[str] | tuple[str, ...] = ()) -> CN:
    """Reads a detection YAML plus ``KEY VALUE`` overrides into a (not yet adjusted) config.

    Raises DetectionSetupError for a missing file, an unknown key or an odd-length override list.
    """
    config_file = Path(config_file)
    if not config_file.is_file():
        raise DetectionSetupError(f"detection config {config_file} does not exist; fix: pass one of "
                                  f"{sorted(str(p) for p in _config_dir().glob('*.yaml'))}")
    opts = list(opts or [])
    if len(opts) % 2:
        raise DetectionSetupError(f"overrides must be KEY VALUE pairs, got an odd number: {opts}; "
                                  "fix: e.g. SOLVER.MAX_ITER 1000 MODEL.WEIGHTS w.pkl")
    cfg = base_config()
    fix = ("fix: check the key's spelling against detectron2's config reference (detectron2/config/defaults.py) "
           "or INTL.* in transfer/detection/config.py")
    try:
        cfg.merge_from_file(str(config_file))
    except KeyError as e:
        raise DetectionSetupError(f"{config_file}: {e.args[0] if e.args else e}; {fix}") from e
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError, ValueError) as e:
        raise DetectionSetupError(f"override in {opts}: {e.args[0] if e.args else e}; {fix}") from e
    return cfg


def _config_dir() -> Path:
    return config_dir() / "detection"


def resolve_norm(requested: str, world_size: int, cuda: bool) -> str:
    """The norm layer that does what ``requested`` means for this world size and device."""
    if requested in ("SyncBN", "naiveSyncBN", "nnSyncBN"):
        if world_size <= 1:
            return "BN"
        if not cuda:
            return "naiveSyncBN"
    return requested


def explicit_keys(opts: list[str] | tuple[str, ...]) -> set[str]:
    return {str(k) for k in list(opts)[0::2]}


def scale_to_batch(cfg: CN, explicit: set[str] = frozenset()) -> str:
    """Scales BASE_LR linearly and the schedule inversely when IMS_PER_BATCH differs from the reference.

    detectron2's own ``DefaultTrainer.auto_scale_workers`` does the same keyed on the number of processes
    (SOLVER.REFERENCE_WORLD_SIZE); here the key is the global batch, because on CPU and small GPUs the
    images per process change too. A BASE_LR given explicitly on the command line is kept as given.
    Returns a one-line description for the start-up log. ``cfg`` must be unfrozen.
    """
    ref = int(cfg.INTL.REFERENCE_IMS_PER_BATCH)
    ims = int(cfg.SOLVER.IMS_PER_BATCH)
    if ref <= 0 or ims == ref:
        return f"effective batch {ims} images, lr {cfg.SOLVER.BASE_LR:g} (as configured)"
    factor = ims / ref
    parts = []
    if "SOLVER.BASE_LR" in explicit:
        parts.append(f"lr {cfg.SOLVER.BASE_LR:g} (given explicitly, not scaled)")
    else:
        old = cfg.SOLVER.BASE_LR
        cfg.SOLVER.BASE_LR = old * factor
        parts.append(f"lr {cfg.SOLVER.BASE_LR:g} (= {old:g} x {ims}/{ref}, linear scaling)")
    if "SOLVER.MAX_ITER" in explicit:
        parts.append(f"schedule as given ({cfg.SOLVER.MAX_ITER} iterations)")
    else:
        inv = ref / ims
        cfg.SOLVER.MAX_ITER = int(round(cfg.SOLVER.MAX_ITER * inv))
        cfg.SOLVER.STEPS = tuple(int(round(s * inv)) for s in cfg.SOLVER.STEPS)
        cfg.SOLVER.WARMUP_ITERS = int(round(cfg.SOLVER.WARMUP_ITERS * inv))
        if cfg.TEST.EVAL_PERIOD > 0:
            cfg.TEST.EVAL_PERIOD = int(round(cfg.TEST.EVAL_PERIOD * inv))
        cfg.SOLVER.CHECKPOINT_PERIOD = max(1, int(round(cfg.SOLVER.CHECKPOINT_PERIOD * inv)))
        parts.append(f"{cfg.SOLVER.MAX_ITER} iterations, steps {tuple(cfg.SOLVER.STEPS)} (x {ref}/{ims}, same epochs)")
    cfg.INTL.REFERENCE_IMS_PER_BATCH = ims  # applied once: a resumed or re-read config is not rescaled
    return f"effective batch {ims} images (config written for {ref}): " + ", ".join(parts)


def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists a bf16 instruction set (avx512_bf16, amx_bf16); False elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def adjust_for_run(cfg: CN, opts, world_size: int, cuda: bool, native_bf16: bool | None = None) -> list[str]:
    """Applies the run-time choices (device, norm, batch scaling, CPU mixed precision) to an unfrozen config;
    returns log lines. ``native_bf16``: whether this CPU has bf16 instructions (None: read /proc/cpuinfo)."""
    lines = []
    cfg.MODEL.DEVICE = "cuda" if cuda else "cpu"
    if not cuda and cfg.SOLVER.AMP.ENABLED and not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        cfg.SOLVER.AMP.ENABLED = False
        lines.append("amp: SOLVER.AMP.ENABLED turned off: this CPU has no native bf16 (avx512_bf16 / amx_bf16), "
                     "so a bf16 autocast would be emulated and many times slower than float32")
    norm = resolve_norm(cfg.MODEL.RESNETS.NORM, world_size, cuda)
    if norm != cfg.MODEL.RESNETS.NORM:
        lines.append(f"norm: config asks {cfg.MODEL.RESNETS.NORM}, using {norm} "
                     f"({world_size} process{'es' if world_size > 1 else ''}, {'cuda' if cuda else 'cpu'})")
        cfg.MODEL.RESNETS.NORM = norm
    else:
        lines.append(f"norm: {norm}")
    ims = int(cfg.SOLVER.IMS_PER_BATCH)
    if ims % world_size:
        raise DetectionSetupError(f"SOLVER.IMS_PER_BATCH={ims} is not divisible by the world size {world_size}; "
                                  f"fix: use a multiple of {world_size} images or another number of processes")
    lines.append(scale_to_batch(cfg, explicit_keys(opts)) + f", {ims // world_size} per process x {world_size}")
    return lines
