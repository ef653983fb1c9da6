"""Fine-tune detectron2's Mask R-CNN R50-C4 from a converted SSL backbone: one seed, one run folder.

    python -m transfer.detection.train_net --config-file configs/detection/coco_R_50_C4_1x.yaml \\
        [--resume] [--num-gpus N] [--output-dir DIR] MODEL.WEIGHTS out.pkl [KEY VALUE ...]

``submit detection`` calls :func:`run_task` once per process (after exporting RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with ``output_dir=outputs/detection/<name>/seed<k>``; before
queueing it calls :func:`preflight` (config, dataset files, weights file). A run folder holds
detectron2's files (config.yaml, log.txt, metrics.json, TensorBoard events in tb/, model_*.pth,
last_checkpoint, inference/) plus results.json, metrics.jsonl, loss_curve.png and COMPLETE.

Resume semantics: with ``resume`` (the default of run_task, and ``--resume``) a run continues from the
last checkpoint in its folder when there is one (optimizer, scheduler and iteration included);
otherwise MODEL.WEIGHTS only initialises a new run at iteration 0. The log says which happened.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import socket
import sys
from pathlib import Path

import torch

import transfer.detection  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from common.atomic import atomic_write_text
from common.distributed import DistInfo, barrier, init_distributed
from common.errors import UserError
from common.provenance import record_attempt
from common.runlog import is_complete, mark_complete
from transfer.detection.config import DetectionSetupError, adjust_for_run, load_config
from transfer.detection.datasets import check_dataset_files, register_datasets
from transfer.detection.report import write_run_outputs
from transfer.detection.weights import CheckedDetectionCheckpointer, WeightsMismatchError

logger = logging.getLogger("transfer.detection")
LOGGER_NAMES = ("detectron2", "fvcore", "transfer.detection")
_SEED_DIR = re.compile(r"^seed(\d+)$")


def default_output_dir(config_file: str | os.PathLike, seed: int) -> Path:
    return Path("outputs") / "detection" / Path(config_file).stem / f"seed{max(seed, 0)}"


def _is_local_file_uri(weights: str) -> bool:
    return bool(weights) and "://" not in weights


def check_weights_file(cfg) -> None:
    """MODEL.WEIGHTS exists and fits the model's backbone: loaded, as the run will load it (the checkpointer
    that raises WeightsMismatchError), into the model built on the meta device (names and shapes only)."""
    w = cfg.MODEL.WEIGHTS
    fix = ("fix: convert a pretraining checkpoint with `intl-convert CHECKPOINT OUT.pkl` and pass OUT.pkl, or "
           "MODEL.WEIGHTS \"\" for random init")
    if not _is_local_file_uri(w):
        return
    if not Path(w).expanduser().is_file():
        raise DetectionSetupError(f"MODEL.WEIGHTS {w} does not exist; {fix}")
    import warnings

    from detectron2.modeling import build_model

    meta = cfg.clone()
    meta.defrost()
    meta.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(meta)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            CheckedDetectionCheckpointer(model).load(str(Path(w).expanduser()))
    except WeightsMismatchError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the file is, it is not weights detectron2 can load
        raise DetectionSetupError(f"MODEL.WEIGHTS {w} could not be loaded ({type(e).__name__}: {e}); {fix}") from None


def preflight(config_file: str | os.PathLike, opts=(), world_size: int | None = None):
    """What the launcher checks before queueing: the config loads, dataset files and the weights file exist,
    and (when ``world_size`` is given) the global batch divides into it.

    Returns the loaded config (not adjusted for a world size); raises DetectionSetupError otherwise.
    """
    cfg = load_config(config_file, opts)
    check_dataset_files(cfg)
    check_weights_file(cfg)
    if world_size is not None:
        adjust_for_run(cfg.clone(), list(opts), world_size, torch.cuda.is_available())
    return cfg


def _choose_seed(cfg, output_dir: Path) -> int:
    """SEED from the config / overrides; if negative, k of an output folder named seed<k>, else random."""
    if cfg.SEED >= 0:
        return int(cfg.SEED)
    m = _SEED_DIR.match(output_dir.name)
    return int(m.group(1)) if m else random.SystemRandom().randrange(2**31)


def setup(config_file, opts, output_dir, dist_info: DistInfo):
    """Loads and adjusts the config for this run (device, norm, batch scaling, seed), registers datasets."""
    cfg = load_config(config_file, opts)
    lines = adjust_for_run(cfg, opts, dist_info.world_size, dist_info.device.type == "cuda")
    out = Path(output_dir) if output_dir else (Path(cfg.OUTPUT_DIR) if "OUTPUT_DIR" in opts[0::2]
                                               else default_output_dir(config_file, cfg.SEED))
    cfg.OUTPUT_DIR = str(out)
    cfg.SEED = _choose_seed(cfg, out)
    register_datasets(cfg)
    cfg.freeze()
    return cfg, lines


class _RunLog:
    """Console logging once per process (detectron2's setup_logger) + this run's log.txt on rank 0."""

    def __init__(self, output_dir: Path, rank: int):
        from detectron2.utils.logger import setup_logger

        for name in LOGGER_NAMES:
            setup_logger(output=None, distributed_rank=rank, name=name,
                         abbrev_name="d2" if name == "detectron2" else name)
        self.handler = None
        if rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(output_dir / "log.txt")
            self.handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                                                        "%m/%d %H:%M:%S"))
            for name in LOGGER_NAMES:
                logging.getLogger(name).addHandler(self.handler)

    def close(self):
        if self.handler is not None:
            for name in LOGGER_NAMES:
                logging.getLogger(name).removeHandler(self.handler)
            self.handler.close()


def _setup_local_process_group(dist_info: DistInfo) -> None:
    """detectron2's comm needs a per-machine group (its launch() makes one); processes started by our
    launcher get it here, sized by the ranks sharing this host name."""
    from detectron2.utils import comm

    if dist_info.world_size <= 1 or comm._LOCAL_PROCESS_GROUP is not None:
        return
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None:
        names = [None] * dist_info.world_size
        torch.distributed.all_gather_object(names, socket.gethostname())
        local = names.count(socket.gethostname())
    comm.create_local_process_group(int(local))


def _read_results(output_dir: Path) -> dict | None:
    path = output_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_task(config_file, opts=(), output_dir=None, resume: bool = True) -> dict | None:
    """Trains and evaluates one seed; returns the results dict on rank 0 (None on other ranks).

    A folder already marked COMPLETE returns its results at once.
    """
    opts = list(opts or [])
    dist_info = init_distributed()
    _setup_local_process_group(dist_info)
    cfg, adjust_lines = setup(config_file, opts, output_dir, dist_info)
    out = Path(cfg.OUTPUT_DIR)
    if is_complete(out) and (results := _read_results(out)) is not None:
        print(f"[detection] {out} is complete (COMPLETE marker); returning its results without training", flush=True)
        return results if dist_info.is_main else None
    if dist_info.is_main:
        record_attempt(out, dist_info.world_size)

    runlog = _RunLog(out, dist_info.rank)
    try:
        return _train(cfg, config_file, opts, resume, dist_info, adjust_lines)
    finally:
        runlog.close()


def _train(cfg, config_file, opts, resume, dist_info, adjust_lines) -> dict | None:
    from detectron2.utils.env import seed_all_rng

    from transfer.detection.trainer import Trainer

    out = Path(cfg.OUTPUT_DIR)
    logger.info("detection run %s: config %s, overrides %s, rank %d of %d, device %s",
                out, config_file, opts, dist_info.rank, dist_info.world_size, cfg.MODEL.DEVICE)
    for line in adjust_lines:
        logger.info(line)
    logger.info("schedule: %d iterations, lr steps %s, warm-up %d, AMP %s, train %s, test %s, seed %d",
                cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.AMP.ENABLED,
                tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST), cfg.SEED)
    check_dataset_files(cfg)
    check_weights_file(cfg)
    if dist_info.is_main:
        atomic_write_text(out / "config.yaml", cfg.dump())
    seed_all_rng(cfg.SEED + dist_info.rank)

    trainer = Trainer(cfg)
    last = trainer.checkpointer.get_checkpoint_file() if trainer.checkpointer.has_checkpoint() else None
    if resume and last:
        logger.info("RESUMING this run from %s (model, optimizer, scheduler, iteration); "
                    "MODEL.WEIGHTS is not used", last)
    else:
        why = "--resume not given" if not resume else "no checkpoint in the run folder"
        src = cfg.MODEL.WEIGHTS or "random initialisation (MODEL.WEIGHTS is empty)"
        logger.info("STARTING a new run at iteration 0 from %s (%s)", src, why)
    trainer.resume_or_load(resume=resume)
    if trainer.start_iter:
        logger.info("continuing at iteration %d of %d", trainer.start_iter, trainer.max_iter)
    eval_results = trainer.train()
    barrier()
    if not dist_info.is_main:
        return None
    info = {
        "name": out.parent.name, "seed": int(cfg.SEED), "config_file": str(config_file), "overrides": opts,
        "weights": cfg.MODEL.WEIGHTS, "iterations": int(cfg.SOLVER.MAX_ITER),
        "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH), "base_lr": float(cfg.SOLVER.BASE_LR),
        "world_size": dist_info.world_size, "train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST),
    }
    if not eval_results:
        raise RuntimeError(f"training of {out} ended without evaluation results; its log is {out / 'log.txt'}")
    results = write_run_outputs(out, eval_results, info)
    mark_complete(out, {k: results.get(k) for k in ("bbox", "segm") if k in results})
    logger.info("results written to %s", out / "results.json")
    return results


def _spawned_worker(local_rank: int, world_size: int, port: int, config_file, opts, output_dir, resume) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_task(config_file, opts, output_dir, resume)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m transfer.detection.train_net",
                                description="Mask R-CNN R50-C4 fine-tuning from a converted SSL backbone (one seed).")
    p.add_argument("--config-file", required=True, help="a YAML under configs/detection/")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes on this machine (one per GPU; CPU processes with gloo when there is no GPU)")
    p.add_argument("--output-dir", default=None,
                   help="run folder (default: OUTPUT_DIR if given, else outputs/detection/<config name>/seed<SEED>)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="detectron2 overrides: KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        preflight(args.config_file, args.opts)
        if args.num_gpus > 1:
            import torch.multiprocessing as mp

            mp.start_processes(_spawned_worker, nprocs=args.num_gpus, start_method="spawn",
                               args=(args.num_gpus, _free_port(), args.config_file, args.opts, args.output_dir,
                                     args.resume))
            return 0
        results = run_task(args.config_file, args.opts, args.output_dir, resume=args.resume)
    except UserError as e:  # DetectionSetupError, CheckpointError, ...: the message names the fix
        print(f"detection: error: {e}", file=sys.stderr)
        return 2
    if results:
        print(json.dumps({t: {m: results[t].get(m) for m in ("AP50", "AP", "AP75")}
                          for t in ("bbox", "segm") if t in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
