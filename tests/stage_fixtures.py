"""Test-only stages for the launcher tests (registered through INTL_SUBMIT_EXTRA_STAGES, never in the product).

``counter``: a resumable stand-in for a training stage that follows the ARCHITECTURE.md contract
(``run(cfg)`` in every process, init_distributed, resume from ``cfg.run_dir``, provenance.json at the start,
results.json and COMPLETE at the end). Each
step does a gloo all_reduce (so a wrong world size or rendezvous fails), sleeps ``step_seconds`` and rank 0
writes ``last.pth`` atomically. Every rank writes ``env_rank<r>.json`` with the launcher-visible
environment, so the tests can check the tasks, ranks and GPU binding Slurm gave the job.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.atomic import atomic_torch_save, write_json
from common.config import compose_config
from common.distributed import barrier, init_distributed
from common.errors import ConfigError
from common.provenance import record_attempt
from common.runlog import is_complete, mark_complete, write_results

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

COUNTER_YAML = """\
name: counter
run_dir: outputs/counter/${name}
seed: 0
steps: 6
step_seconds: 0.2
fail: false
data:
  root: null
"""

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
            "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE",
            "SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
            "INTL_COLLECTIVE_TIMEOUT_MIN")


def tiny_pretrain_overrides(data_root: Path, steps: int, ckpt_every: int) -> list[str]:
    """The real pretraining stage's synthetic preset cut down to a few steps of a ResNet-18 with a small
    projector (keys of configs/pretrain.yaml and configs/pretrain/preset/synthetic.yaml)."""
    return ["pretrain/preset=synthetic", f"data.root={data_root}", "data.workers=0", "optim.batch_size=16",
            "model.projector=[64,64]", f"train.max_steps={steps}", f"train.ckpt_every_steps={ckpt_every}",
            "train.log_every=1", "train.spectrum_every=0"]


def tiny_protocol_args(data: Path, *extra: str) -> list[str]:
    """`submit protocol` arguments of the tiny protocol on the tiny embedded sets (tests/conftest.py
    ``tiny_synthetic``): a ResNet-50 (detection needs one) pretrained on 16-px views, batch 16, 2 epochs of 7 steps,
    last.pth every 2 steps, the online probe and the k-NN monitor off; every evaluation cut to a couple of steps
    and the detection to 2 iterations on 64-px images (the settings of tests/e2e/test_detection_e2e.py)."""
    coco = data / "coco"
    sets = [["synthetic_coco_train", str(coco / "instances_train.json"), str(coco)],
            ["synthetic_coco_val", str(coco / "instances_val.json"), str(coco)]]
    detection = {"INTL.COCO_JSON_SETS": repr(sets), "SOLVER.IMS_PER_BATCH": "2", "SOLVER.MAX_ITER": "2",
                 "SOLVER.STEPS": "(1,)", "SOLVER.WARMUP_ITERS": "1", "SOLVER.CHECKPOINT_PERIOD": "1000",
                 "SOLVER.AMP.ENABLED": "False", "TEST.PRECISE_BN.ENABLED": "False", "INPUT.MIN_SIZE_TRAIN": "(64,)",
                 "INPUT.MIN_SIZE_TEST": "64", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": "4",
                 "MODEL.RPN.POST_NMS_TOPK_TEST": "20", "TEST.DETECTIONS_PER_IMAGE": "10"}
    return ["pretrain/preset=synthetic", "pretrain/model=resnet50", f"data.root={data / 'classification'}",
            "data.workers=0", "optim.batch_size=16", "model.projector=[64,64]", "optim.epochs=2",
            "train.ckpt_every_steps=2", "train.log_every=1", "train.spectrum_every=0", "train.online_probe=false",
            "train.knn_every=0",
            "++data.augment.views=[{size:16,min_scale:1.0,max_scale:1.0},{size:16,min_scale:1.0,max_scale:1.0}]",
            "eval:data.workers=0", "knn:knn.batch_size=64", "linear:optim.epochs=1", "linear:optim.milestones=[1]",
            "linear:train.max_steps_per_epoch=2", "semi:optim.epochs=1", "semi:train.max_steps_per_epoch=2",
            *(f"detection:{k}={v}" for k, v in detection.items()), *extra]


def wait_for_step(run: Path, step: int, timeout: float = 90) -> int:
    """Polls ``run/last.pth`` until it holds ``step`` or later (a job running elsewhere); returns that step."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            done = int(torch.load(run / "last.pth")["step"])
            if done >= step:
                return done
        except (FileNotFoundError, EOFError, RuntimeError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"the job did not reach step {step} in {timeout} s")


def write_counter_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "counter.yaml").write_text(COUNTER_YAML)
    return folder


def extra_stages_env(config_folder: Path) -> str:
    """The INTL_SUBMIT_EXTRA_STAGES value registering the counter stage."""
    return f"counter=stage_fixtures:run@{config_folder}"


def validate_config(cfg, world_size: int = 1) -> None:
    """The stage's up-front check (the launcher calls it before queueing): the data folder must exist."""
    if cfg.data.root is not None and not Path(cfg.data.root).is_dir():
        raise ConfigError(f"data.root={cfg.data.root} is not a folder; fix: pass data.root=<existing folder>")
    if int(cfg.steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {cfg.steps}")


def run(cfg) -> dict | None:
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    print(f"counter: rank {info.rank} world size {info.world_size} backend {info.backend}", flush=True)
    if is_complete(run_dir):
        print("counter: run already complete", flush=True)
        return json.loads((run_dir / "results.json").read_text()) if info.is_main else None
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        record_attempt(run_dir, info.world_size)
    seen = {k: os.environ.get(k) for k in ENV_KEYS}
    if info.world_size > 1:  # the timeout the process group was made with
        seen["pg_timeout_s"] = torch.distributed.distributed_c10d._get_default_group().options._timeout.total_seconds()
    write_json(run_dir / f"env_rank{info.rank}.json", seen)
    ckpt = run_dir / "last.pth"
    start = int(torch.load(ckpt)["step"]) if ckpt.exists() else 0
    if start:
        print(f"counter: resumed from step {start}", flush=True)
    if cfg.fail:
        raise RuntimeError("counter stage asked to fail (fail=true)")
    for step in range(start, int(cfg.steps)):
        t = torch.ones(1)
        if info.world_size > 1:
            torch.distributed.all_reduce(t)
        if int(t.item()) != info.world_size:
            raise RuntimeError(f"all_reduce gave {t.item()}, expected world size {info.world_size}")
        time.sleep(float(cfg.step_seconds))
        if info.is_main:
            atomic_torch_save({"step": step + 1, "world_size": info.world_size}, ckpt)
            print(f"counter: step {step + 1}/{cfg.steps}", flush=True)
    barrier()
    if not info.is_main:
        return None
    results = write_results(run_dir, {"steps": int(cfg.steps), "world_size": info.world_size, "resumed_from": start})
    mark_complete(run_dir, results)
    return results


def environment_seen(cfg) -> dict:
    """A stand-in entry point: what the task's environment holds when the stage starts."""
    return dict(os.environ)


# ------------------------------------------------------------------ a detection-like stage (seeds flow)
def preflight(config_file, opts) -> None:
    """Up-front check of the detection-like stage: the config file must name a YAML mapping."""
    import yaml

    if not isinstance(yaml.safe_load(Path(config_file).read_text()), dict):
        raise ConfigError(f"{config_file} is not a YAML mapping; fix: pass a detectron2 config file")


def run_seed(config_file, opts=(), output_dir=None, resume: bool = True) -> dict | None:
    """Stands in for transfer.detection.train_net.run_task: results.json with metrics that depend on SEED."""
    info = init_distributed()
    opts = list(opts)
    seed = int(opts[opts.index("SEED") + 1])
    out = Path(output_dir)
    results = {task: {"AP": 10.0 + seed, "AP50": 20.0 + seed, "AP75": 5.0 + seed} for task in ("bbox", "segm")}
    if info.is_main:
        write_json(out / "results.json", results)
        write_json(out / "opts.json", {"opts": opts, "world_size": info.world_size,
                                       "torch_threads": torch.get_num_threads()})
        mark_complete(out, results)
    barrier()
    return results if info.is_main else None


def compose_pretrain(overrides=()):
    """The pretraining config composed the way the launcher does it."""
    return compose_config("pretrain", list(overrides))


def tiny_overrides(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """ResNet-18 (ImageNet stem) on 16-px views of the tiny 32-px synthetic set: ~0.2 s per step."""
    return [f"data.root={data_root / 'classification'}", f"run_dir={run_dir}", "data.workers=0",
            "++data.augment.views=[{size:16,min_scale:0.2},{size:16,min_scale:0.2}]",
            "model.arch=resnet18", "model.projector=[64,64,64]", "optim.batch_size=16", "optim.epochs=1",
            "optim.warmup_epochs=0", "train.log_every=1", "train.spectrum_every=0", *extra]


def free_port() -> int:
    """A free TCP port for a test's rendezvous, drawn below Linux's ephemeral range (32768-60999), as
    slurm.jobs does for jobs: a port the kernel handed out (bind to 0) is in that range, where every client
    socket of the other tests' gloo / TCPStore connections also takes its port, so it could be taken again
    before the rendezvous binds it (a two-process test then hung: one rank met another test's store)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def linear_cfg(data_root: Path, run_dir: Path, *extra: str):
    """The linear synthetic preset on the tiny set: 120 train / 40 val 32-px images, 3 steps of 40 per epoch."""
    return compose_config("linear", ["eval/linear=synthetic", f"data.root={data_root / 'classification'}",
                                     f"run_dir={run_dir}", "data.workers=0", "optim.batch_size=40",
                                     "train.log_every=1", *extra])


def semi_cfg(data_root: Path, run_dir: Path, *extra: str):
    """The semi synthetic preset (class-balanced 10% drawn from seed) on the tiny set: 12 labelled images."""
    return compose_config("semi", ["eval/semi=synthetic", f"data.root={data_root / 'classification'}",
                                   f"run_dir={run_dir}", "data.workers=0", "optim.batch_size=4",
                                   "train.log_every=1", "model.arch=resnet18", *extra])


def knn_cfg(data_root: Path, run_dir: Path, *extra: str):
    """The k-NN synthetic preset on the tiny set, random-init ResNet-18 unless weights= is given."""
    return compose_config("knn", ["eval/knn=synthetic", f"data.root={data_root / 'classification'}",
                                  f"run_dir={run_dir}", "data.workers=0", "knn.batch_size=40",
                                  "model.arch=resnet18", *extra])


def random_backbone_file(path: Path, seed: int, finished: bool | None = None, step: int = 5) -> Path:
    """A random small-stem ResNet-18 backbone saved as a torchvision state_dict (``finished`` None) or as a
    pretraining checkpoint of ``step`` with that ``finished`` flag (no training: its numbers do not matter)."""
    from common.checkpoint import BACKBONE_PREFIX, save_checkpoint
    from common.resnet import build_resnet

    torch.manual_seed(seed)
    sd = build_resnet("resnet18", small_stem=True).state_dict()
    if finished is None:
        torch.save(sd, path)
        return path
    return save_checkpoint({"model": {BACKBONE_PREFIX + k: v for k, v in sd.items()}, "ema_model": None,
                            "epoch": 1, "step": step, "finished": finished,
                            "config": {"model": {"arch": "resnet18", "small_stem": True}}}, path)


def build_engine(cfg):
    """The pretraining engine of a composed config, in this process (no launcher)."""
    from common.distributed import init_distributed
    from pretrain.engine import PretrainEngine
    from pretrain.train import validate_config

    return PretrainEngine(validate_config(cfg), init_distributed())


def nan_loss_at(engine, bad_step: int):
    """Makes the objective return a NaN loss when the engine is at ``bad_step`` (0-based)."""
    forward = engine.objective.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        if engine.step == bad_step:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    engine.objective.forward = patched


def write_stl10_binary(root: Path, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 30,
                       seed: int = 0) -> dict:
    """STL-10's binary release in miniature under ``root/stl10_binary/``, in the exact on-disk layout of the
    official files: ``<split>_X.bin`` raw uint8, each image 3 x 96 x 96 stored channel by channel with each
    channel column-major (torchvision reads ``reshape(-1, 3, 96, 96)`` then swaps the last two axes), and
    ``<split>_y.bin`` one uint8 label per image, 1-based (1..10); ``class_names.txt`` one name per line.
    Returns the images (N, 96, 96, 3 as PIL sees them) and 0-based labels per split."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, labelled in (("train", n_train, True), ("test", n_test, True), ("unlabeled", n_unlabeled, False)):
        labels = np.arange(n) % 10
        images = np.empty((n, 96, 96, 3), np.uint8)
        for i, y in enumerate(labels):  # a class-dependent colour plus noise: learnable, distinct per image
            base = np.array([25 * y, 255 - 20 * y, (70 * y) % 256], np.float32)
            images[i] = np.clip(base + rng.normal(0, 30, (96, 96, 3)), 0, 255).astype(np.uint8)
        # (N, H, W, C) -> on disk (N, C, W, H): channel-major, each channel column-major
        images.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
        if labelled:
            (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        out[split] = (images, labels if labelled else None)
    (folder / "class_names.txt").write_text("\n".join(
        ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    return out


def write_images(paths, size: int = 16, seed: int = 0) -> None:
    """Small random JPEG (or PNG, by suffix) files at ``paths`` (folders created)."""
    rng = np.random.default_rng(seed)
    for p in paths:
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)


def randomised(model, seed: int):
    """Gives every parameter and BN running stat distinct random values, so a wrong mapping is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "running_var" in name else 0.0))
    return model
