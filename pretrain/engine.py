"""The pretraining engine: one process of a (possibly distributed) INTL run.

``PretrainEngine(cfg, dist_info).fit()`` builds the data, the network, the objective
(``pretrain.methods.build_method``) and the optimiser, resumes from ``<run_dir>/last.pth`` if there is one,
and trains to the end of the schedule:

- DDP over the processes of the job (nccl on GPUs, gloo on CPU processes) with batch norm over the
  global batch (torch's SyncBatchNorm on CUDA, ``pretrain.model.GlobalBatchNorm`` on CPU); the
  objective all-gathers the projections so IterNorm whitens the global batch.
- Mixed precision on GPU (bf16, or fp16 with a grad scaler); the objective computes whitening and losses
  in float32. A non-finite loss is caught before any weight changes: the step, the loss parts and the
  spectrum are reported, and the run stops (``train.on_nonfinite=stop``) or skips the batch (``skip``);
  a skipped batch also puts back the batch-norm statistics its forward moved (online and EMA).
- Checkpoints (DESIGN.md format, atomic, never with a NaN/inf tensor) every ``train.ckpt_every_steps``
  steps and at every epoch end; temporaries left by killed writes are removed at start and end. The
  ``last.pth`` a write replaces stays as ``last.prev.pth`` when it is readable; a start whose ``last.pth``
  cannot be read (cut by a full disk, a partial copy, garbage) resumes from the newest readable of
  ``last.prev.pth`` and the snapshots (``common.checkpoint.find_resume_point``), saying so in the log, in a
  ``checkpoint_fallback`` metrics row and in ``COMPLETE``; every rank checks that all resume from one step.
  The resumed run continues the same trajectory: the data order and every augmentation are functions of
  ``(seed, epoch, index)`` (``pretrain.data_loading``), and the steps already done in the epoch are skipped;
  a resume with another total of steps (``optim.epochs``, ``train.max_steps``) is refused.
- The requeue signal (Slurm's time-out ``USR2``, ``common.preemption``) is held back to the end of the step:
  every rank stops at the same step (the flag rides on the step's one collective), rank 0 writes
  ``last.pth`` there, then submitit's handler runs and requeues as before, so the requeued job resumes at
  exactly that step; without a handler (plain ``python -m pretrain.train``) the run stops with exit status 2
  and says from which step it resumes when started again.
- Metrics every ``train.log_every`` steps to ``metrics.jsonl`` and TensorBoard (a resume drops the rows
  and TensorBoard events of the steps it repeats, and a torn last line), with a progress line and
  ETA; the spectrum of the embedding covariance every ``train.spectrum_every`` steps (with FroSSL's
  top-k condition number and entropy, k = ``train.spectrum_topk``); ``spectrum.png``, ``spectrum_topk.png``
  and ``loss.png`` at the end.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from common import runlog
from common.atomic import remove_stale_temporaries, write_json
from common.checkpoint import (
    LAST_NAME,
    SNAPSHOT_PATTERN,
    find_resume_point,
    load_checkpoint,
    save_checkpoint,
    snapshot_files,
)
from common.distributed import DistInfo, all_reduce_mean, all_reduce_sum_start, barrier, gather_with_grad
from common.errors import ConfigError, UserError
from common.imagefolder import unreadable_files_all_ranks, write_unreadable_list
from common.preemption import DeferredSignal
from pretrain.augment import build_view_transform
from pretrain.data_loading import EpochShardSampler, build_dataset, build_loader, num_skipped, steps_per_epoch
from pretrain.methods import build_method
from pretrain.model import build_network, convert_sync_batchnorm, ema_update, make_momentum_copy
from pretrain.monitor import OnlineProbe, build_monitor_sets, num_classes_of
from pretrain.monitor import evaluate as monitor_evaluate
from pretrain.optim import (
    OPTIM_KEYS_BEFORE_LARS,
    build_optimizer,
    ema_momentum_scheduler,
    lr_scheduler,
    scaled_lr,
    set_lr,
)
from pretrain.plots import plot_loss, plot_monitor, plot_spectrum, plot_top_eigenvalues
from pretrain.spectrum import (
    condition_number,
    covariance_spectrum,
    effective_rank,
    eigenvalue_entropy,
    lg_ioc,
    saturation_step,
    top_k,
)

log = logging.getLogger("pretrain")

# Config sections a resumed run must share with the run that wrote the checkpoint.
RESUME_MUST_MATCH = ("model", "method", "optim", "data.kind")
MAX_SPECTRUM_POINTS = 512
MAX_CONSECUTIVE_SKIPS = 20


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf; the previous checkpoint is intact."""


class ResumeError(UserError, RuntimeError):
    """The run folder holds a run that this config cannot continue."""


class RunInterrupted(UserError, RuntimeError):
    """The requeue signal came with no handler to requeue the job; the checkpoint of the stop step is written."""


# ----------------------------------------------------------------------------------------- one step
def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on this device (None: full precision)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a GPU; fix: train.amp=off (or bf16) on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def forward_loss(model: nn.Module, objective: nn.Module, views: Sequence[torch.Tensor],
                 target_model: nn.Module | None = None, amp_dtype: torch.dtype | None = None):
    """Projector outputs and the objective's output dict for one batch of views.

    With an EMA objective, crop 0 goes through ``target_model`` (no gradient) and the other crops
    through ``model``; otherwise every crop goes through ``model``.
    """
    device_type = views[0].device.type
    with torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if objective.uses_ema:
            online = model(list(views[1:]))
            with torch.no_grad():
                target = target_model([views[0]])[0]
            out = objective(online, target=target)
        else:
            online = model(list(views))
            out = objective(online)
    return out, online


def start_step_vote(loss: torch.Tensor, stop: bool = False) -> Callable[[], tuple[bool, bool]]:
    """Starts the step's one collective: the number of processes whose loss is not finite and of those that ask
    to stop, summed over ranks on the device without waiting; the returned function waits and answers (the loss
    is finite on every process, some process asks to stop), the same on every rank.

    Started before the backward and read after it, as torch's GradScaler reads its found_inf: on a GPU the host
    does not wait for the forward before queueing the backward (one read per step, after the backward)."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float32).reshape(()),
                         torch.full((), float(stop), dtype=torch.float32, device=loss.device)])
    summed = all_reduce_sum_start(flags)

    def answer() -> tuple[bool, bool]:
        nonfinite, stops = summed().tolist()
        return nonfinite == 0, stops > 0
    return answer


@dataclass
class StepOutput:
    out: dict
    online: list
    finite: bool
    stop: bool = False  # some rank asked to stop after this step (the requeue signal came)


def train_step(model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
               views: Sequence[torch.Tensor], target_model: nn.Module | None = None,
               scaler: Any = None, amp_dtype: torch.dtype | None = None, stop: bool = False) -> StepOutput:
    """Forward, loss, backward, and (only when the loss is finite on every rank) the optimiser step.

    ``stop``: this rank asks to stop after the step; the answer (any rank asked) is in ``StepOutput.stop``.

    The finiteness vote (``start_step_vote``) is read once, after the backward. A non-finite loss: its gradients
    are dropped and the optimiser (and grad scaler) does not step; the forward ran in training mode and so moved
    the batch-norm running statistics (online and target): they are put back, so the step leaves every parameter,
    buffer and optimiser state exactly as before.
    """
    buffers = [b for m in (model, target_model) if m is not None for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    out, online = forward_loss(model, objective, views, target_model, amp_dtype)
    loss = out["loss"]
    vote = start_step_vote(loss, stop)
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    finite, stop = vote()
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
    elif scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepOutput(out, online, finite, stop)


def spectrum_metrics(z: torch.Tensor, topk: int) -> dict:
    """Covariance spectrum of the projections (global batch), its effective rank and lgIoC, and over its
    ``topk`` largest eigenvalues (``top_eigenvalues``) the condition number and entropy (FroSSL)."""
    eigs = covariance_spectrum(z.detach().float())
    n = eigs.numel()
    top = top_k(eigs, topk)
    row = {"effective_rank": effective_rank(eigs), "lg_ioc": lg_ioc(eigs),
           "condition_topk": condition_number(top, topk), "entropy_topk": eigenvalue_entropy(top),
           "top_eigenvalues": [float(e) for e in top]}
    if n > MAX_SPECTRUM_POINTS:  # keep metrics.jsonl small: geometric subsample of the sorted eigenvalues
        idx = sorted({int(round(x)) for x in np.geomspace(1, n, MAX_SPECTRUM_POINTS)})
        row["spectrum"] = [float(eigs[i - 1]) for i in idx]
        row["spectrum_index"] = idx
    else:
        row["spectrum"] = [float(e) for e in eigs]
    return row


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item()) if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _cast_inputs(module: nn.Module, args: tuple, dtype: torch.dtype) -> tuple:
    """Forward pre-hook: the module's tensor inputs in ``dtype`` (train.dtype=float64)."""
    return tuple(a.to(dtype) if torch.is_tensor(a) else a for a in args)


def _fmt_time(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


def check_compile_support(device: torch.device) -> None:
    """train.compile=true on CPU: inductor compiles C++ kernels, so a C++ compiler must be on PATH."""
    if device.type != "cpu":
        return
    candidates = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    if not any(shutil.which(c) for c in candidates):
        raise ConfigError("train.compile=true on CPU needs a C++ compiler for torch.compile's kernels, and none of "
                          f"{candidates} is on PATH; fix: install one (Debian: apt-get install g++) or "
                          "train.compile=false")


class FirstOutput:
    """A forward hook's state: once ``armed``, keeps the (detached) output of the next call of the module it is
    registered on and disarms. The hook is the object itself (``__call__``): torch 2.3's dynamo traces it into the
    network's graph, where a bound method (the engine's, before) broke the graph at every backbone call."""

    def __init__(self):
        self.armed, self.output = False, None

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.armed:
            self.output, self.armed = output.detach(), False


# ----------------------------------------------------------------------------------------- the engine
class PretrainEngine:
    def __init__(self, cfg: DictConfig, dist_info: DistInfo):
        self.cfg = cfg
        self.info = dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / LAST_NAME
        world = dist_info.world_size
        self.global_batch = int(cfg.optim.batch_size)
        self.local_batch = self.global_batch // world

        # Data: the augmentation and the dataset (RobustImageFolder or CIFAR) of cfg.data.
        transform = build_view_transform(cfg.data.augment)
        self.num_views = int(transform.num_views)
        self.dataset = build_dataset(cfg.data, transform)
        self.sampler = EpochShardSampler(len(self.dataset), self.local_batch, dist_info.rank, world, int(cfg.seed))
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), self.global_batch, world)
        self.loader = build_loader(self.dataset, self.sampler, self.local_batch, int(cfg.data.workers),
                                   pin_memory=self.device.type == "cuda")
        self.total_steps = int(cfg.optim.epochs) * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, int(cfg.train.max_steps))

        # Network (the same initial weights on every rank), objective, optimiser, schedules.
        torch.manual_seed(int(cfg.seed))
        net = build_network(cfg.model)
        if world > 1 and cfg.model.sync_bn:
            net = convert_sync_batchnorm(net, self.device)
        # channels_last: NHWC activations, faster convolutions with tensor cores (GPU); a no-op for the maths
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        # train.dtype=float64 (exactness checks): the weights in double precision, and every input of the backbone
        # (the views, the monitor's images) cast to it on the way in; no autocast then.
        self.dtype = getattr(torch, str(cfg.train.dtype))
        self.net = net.to(self.device, dtype=self.dtype, memory_format=self.memory_format)
        if self.dtype != torch.float32:
            self.net.backbone.register_forward_pre_hook(partial(_cast_inputs, dtype=self.dtype))
        self.objective = build_method(cfg.method, global_batch=self.global_batch, world_size=world)
        if self.num_views < 2:
            raise ConfigError(f"data.augment gives {self.num_views} view(s); every method needs at least 2 "
                              "(fix: data.augment.views with two or more entries)")
        self.target = make_momentum_copy(self.net) if self.objective.uses_ema else None
        if world > 1:
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=float(cfg.train.ddp_bucket_mb))
        else:
            self.model = self.net
        # torch.compile after the DDP wrap (torch's DDP + compile recipe: DDPOptimizer splits the graph at DDP's
        # gradient buckets, so their all-reduces still overlap the backward). self.net and self.target stay the
        # plain modules: checkpoints, the EMA update and the monitor use them, so state_dict keys never get
        # torch.compile's "_orig_mod." prefix.
        self.target_forward = self.target
        if cfg.train.compile:
            check_compile_support(self.device)
            if world > 1 and cfg.model.sync_bn:
                # The cross-process batch norm's collective is an autograd.Function that dynamo traces as a
                # higher-order op, which torch 2.3's DDPOptimizer refuses ("Found a higher order op in the graph"):
                # one graph instead, its gradients all-reduced by DDP's reducer after the backward (no overlap).
                torch._dynamo.config.optimize_ddp = False
                log.warning("train.compile with model.sync_bn over %d processes: torch.compile without DDP's graph "
                            "split (torch 2.3 cannot split a graph holding the batch norm's collective), so the "
                            "gradient all-reduce no longer overlaps the backward", world)
            self.model = torch.compile(self.model)
            if self.target is not None:
                self.target_forward = torch.compile(self.target)
        self.peak_lr = scaled_lr(cfg.optim.base_lr, self.global_batch)
        o = cfg.optim
        bias_lr_scale = 1.0 if o.bias_base_lr is None else float(o.bias_base_lr) / float(o.base_lr)
        self.optimizer = build_optimizer(self.net, self.peak_lr, o.momentum, o.weight_decay, name=o.name,
                                         eta=float(o.lars_eta), exclude_bias_and_norm=o.exclude == "bias_and_norm",
                                         bias_lr_scale=bias_lr_scale)
        warmup_steps = int(round(float(cfg.optim.warmup_epochs) * self.steps_per_epoch))
        self.lr_at = lr_scheduler(self.peak_lr, self.total_steps, warmup_steps, float(cfg.optim.final_lr_ratio))
        self.momentum_at = ema_momentum_scheduler(float(cfg.optim.ema_momentum), self.total_steps)
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device) if self.dtype == torch.float32 else None
        self.scaler = torch.cuda.amp.GradScaler() if self.amp_dtype == torch.float16 else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # The monitor: an online linear probe on the backbone features of the first online view (captured by
        # a forward hook, detached) and the periodic k-NN, both evaluated on the validation split.
        self.probe = self._build_probe()
        self.monitor_sets = build_monitor_sets(cfg, self.dataset) if self.probe is not None or \
            cfg.train.knn_every else None
        self.probe_tap = FirstOutput()
        if self.probe is not None:
            self.net.backbone.register_forward_hook(self.probe_tap)

        self.step = 0
        self.nonfinite_skips = 0
        self.last_spectrum: dict | None = None
        self.logger: runlog.MetricsLogger | None = None
        self.requeue_signal = DeferredSignal(where=lambda: f"step {self.step + 1}")  # installed by fit()
        self.resumed_from: Path | None = None  # the checkpoint file resume() read
        self.fallback: dict | None = None  # what resume() passed over to get there (ResumePoint.record)

    # ------------------------------------------------------------------ monitor
    def _build_probe(self) -> OnlineProbe | None:
        want, classes = self.cfg.train.online_probe, num_classes_of(self.dataset)
        if want is None:
            want = bool(classes and classes >= 2)  # on when the training set has labels
            if not want:
                log.warning("the training set has no labels (data.kind=%s, data.split=%s): the online probe is off",
                            self.cfg.data.kind, self.cfg.data.split)
        if not want:
            return None
        if not classes or classes < 2:
            raise ConfigError(f"train.online_probe=true but the training set has {classes or 0} class(es), so no "
                              "labels to probe with; fix: train.online_probe=false (or null: on when there are labels)")
        return OnlineProbe(self.net.backbone.feature_dim, classes, float(self.cfg.train.probe_lr), self.device,
                           self.info.world_size)

    def _monitor_due(self, last: bool) -> tuple[bool, bool]:
        """(probe validation due, k-NN due) after this step: at the epoch ends of their periods, and at the end."""
        t = self.cfg.train
        if self.monitor_sets is None or self.monitor_sets.val is None:
            return False, False
        epoch_end = self.step % self.steps_per_epoch == 0
        epochs = self.step // self.steps_per_epoch
        probe = self.probe is not None and (last or (epoch_end and bool(t.eval_every) and epochs % t.eval_every == 0))
        knn = bool(t.knn_every) and (last or (epoch_end and epochs % t.knn_every == 0))
        return probe, knn

    def _monitor(self, last: bool) -> None:
        probe_due, knn_due = self._monitor_due(last)
        if not (probe_due or knn_due):
            return
        t0 = time.time()
        row = monitor_evaluate(self.net.backbone, self.monitor_sets, self.probe if probe_due else None, knn_due,
                               self.cfg.train, int(self.cfg.data.workers), self.device)
        if self.info.is_main and row:
            self.logger.log(self.step, epoch=self.step / self.steps_per_epoch, **row)
            shown = ", ".join(f"{k} {row[k]:.2f}" for k in ("probe_val_top1", "knn_top1") if k in row)
            log.info("monitor at epoch %.2f (step %d): %s [%.1fs]", self.step / self.steps_per_epoch, self.step, shown,
                     time.time() - t0)

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def save(self, finished: bool = False, snapshot: bool = False) -> None:
        """``last.pth``; with ``snapshot`` also ``epoch_<N>.pth`` (a file never rewritten later, so evaluations
        accept it although the run goes on), then the oldest snapshots beyond ``train.keep_snapshots`` go."""
        if not self.info.is_main:
            return
        state = {
            "model": self.net.state_dict(),
            "ema_model": self.target.state_dict() if self.target is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.step // self.steps_per_epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "world_size": self.info.world_size,
            "rng": self._rng_state(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "finished": finished,
            "probe": self.probe.state() if self.probe is not None else None,
        }
        save_checkpoint(state, self.ckpt_path, keep_previous=True)
        if snapshot:
            epoch = self.step // self.steps_per_epoch
            path = save_checkpoint({**state, "snapshot": True}, self.run_dir / SNAPSHOT_PATTERN.format(epoch=epoch))
            keep = int(self.cfg.train.keep_snapshots)
            old = snapshot_files(self.run_dir)[:-keep] if keep else []
            for _, p in old:
                p.unlink(missing_ok=True)
            log.info("snapshot %s kept%s", path, f"; removed {', '.join(p.name for _, p in old)}" if old else "")

    def _check_resumable(self, saved: dict) -> None:
        now = OmegaConf.to_container(self.cfg, resolve=True)
        if isinstance(saved.get("optim"), dict) and "name" not in saved["optim"]:
            # written before optim.name existed: plain SGD; lars_eta did not matter to it
            before = {**OPTIM_KEYS_BEFORE_LARS, "lars_eta": now["optim"].get("lars_eta")}
            saved = {**saved, "optim": {**before, **saved["optim"]}}
        diffs = []
        for key in RESUME_MUST_MATCH:
            a, b = saved, now
            for part in key.split("."):
                a = a.get(part) if isinstance(a, dict) else None
                b = b.get(part) if isinstance(b, dict) else None
            if a != b:
                diffs.append(f"{key}: checkpoint {a!r} vs now {b!r}")
        if diffs:
            raise ResumeError(f"{self.run_dir} holds a run with a different configuration ({'; '.join(diffs)}); "
                              "fix: choose another name= for a new run, or delete that folder to start over")

    def resume(self) -> bool:
        """Loads the run folder's checkpoint if it has one (``last.pth``, or when that cannot be read the newest
        readable of ``last.prev.pth`` and the snapshots: ``common.checkpoint.find_resume_point``); returns True
        when it did."""
        point = find_resume_point(self.ckpt_path)
        self._check_same_resume_step(point.step if point is not None else 0)
        if point is None:
            return False
        ckpt, self.resumed_from = point.state, point.path
        if point.is_fallback:
            self.fallback = point.record()
            log.warning("checkpoint fallback: %s", point.describe())
        self._check_resumable(ckpt.get("config") or {})
        self._check_same_schedule(ckpt)
        self.net.load_state_dict(ckpt["model"])
        if self.target is not None:
            if ckpt.get("ema_model") is None:
                raise ResumeError(f"{point.path} has no ema_model but method.ema is true; fix: a new name=")
            self.target.load_state_dict(ckpt["ema_model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.probe is not None:
            if ckpt.get("probe"):
                self.probe.load_state(ckpt["probe"])
            else:
                log.warning("%s holds no online-probe state (written without train.online_probe); the probe starts "
                            "from zero at step %s", point.path, ckpt["step"])
        self.step = int(ckpt["step"])
        rng = ckpt.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if torch.cuda.is_available() and len(rng.get("cuda", [])) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        if ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            log.warning("steps per epoch changed from %s to %s (other world size or data set): epoch boundaries "
                        "and the data order after step %d differ from the original run",
                        ckpt["steps_per_epoch"], self.steps_per_epoch, self.step)
        log.info("resuming from step %d (epoch %d) of %s", self.step, self.step // self.steps_per_epoch, point.path)
        return True

    def _check_same_resume_step(self, step: int) -> None:
        """Every rank reads the checkpoint itself: a file one node reads and another cannot (a broken shared
        file system) would make the ranks resume from different steps. One collective at the start."""
        if self.info.world_size == 1:
            return
        moments = all_reduce_mean(torch.tensor([float(step), float(step) ** 2], dtype=torch.float64,
                                               device=self.device))
        if moments[1].item() != moments[0].item() ** 2:
            raise ResumeError(f"the processes of this job resume from different steps (rank {self.info.rank}: "
                              f"step {step}): they do not read the same files in {self.run_dir}; fix: run_dir must "
                              "be on a file system every node sees the same way (check its mount on each node)")

    def _check_same_schedule(self, ckpt: dict) -> None:
        """The cosine lr and EMA schedules are functions of the total steps: a resume may not change it."""
        saved = ckpt.get("total_steps")
        if saved is None or int(saved) == self.total_steps:
            return
        old = ckpt.get("config") or {}
        old_epochs, old_max = (old.get("optim") or {}).get("epochs"), (old.get("train") or {}).get("max_steps")
        raise ResumeError(
            f"{self.resumed_from} (step {ckpt['step']}) belongs to a schedule of {saved} steps "
            f"(optim.epochs={old_epochs}, train.max_steps={old_max}, {ckpt.get('steps_per_epoch')} steps per epoch); "
            "this config gives "
            f"{self.total_steps} (optim.epochs={self.cfg.optim.epochs}, train.max_steps={self.cfg.train.max_steps}, "
            f"{self.steps_per_epoch} per epoch). The learning-rate and EMA-momentum cosines depend on the total, so "
            "resuming would silently change them; fix: resume with the old values, or start a new run folder "
            "(another name=, or submit --new) for the new schedule")

    def _remove_stale_temporaries(self) -> None:
        stale = remove_stale_temporaries(self.ckpt_path)
        if stale:
            log.info("removed %d temporary checkpoint file(s) left by interrupted writes: %s", len(stale),
                     ", ".join(p.name for p in stale))

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        with self.requeue_signal:
            return self._fit()

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.info.is_main:
            self._remove_stale_temporaries()
        resumed = self.resume()
        if self.info.is_main:
            runlog.truncate_metrics(self.run_dir, self.step)  # also rows of an attempt that stopped before a checkpoint
            runlog.save_config(self.run_dir, cfg)
        self.logger = runlog.MetricsLogger(self.run_dir, enabled=self.info.is_main, purge_step=self.step + 1)
        if self.fallback is not None:  # kept with the run's metrics; COMPLETE lists them all
            self.logger.log(self.step, checkpoint_fallback=self.fallback)
        if not resumed:
            log.info("starting a new run in %s", self.run_dir)
        log.info("world size %d, global batch %d (%d per process), %s lr %.4g (= %.4g x %d / 256; biases and norm "
                 "x %.4g), %d views, %d steps (%d per epoch), amp %s, method %s", self.info.world_size,
                 self.global_batch, self.local_batch, cfg.optim.name, self.peak_lr, cfg.optim.base_lr,
                 self.global_batch, self.optimizer.param_groups[-1].get("lr_scale", 1.0), self.num_views,
                 self.total_steps, self.steps_per_epoch, self.amp_dtype or "off", self.objective.name)
        try:
            self._train_loop()
            summary = self._finish()
        except BaseException:
            self.logger.close(quiet=True)  # an error closing it (the same full disk) must not hide this one
            raise
        self.logger.close()
        return summary

    def _train_loop(self) -> None:
        cfg = self.cfg.train
        start_step, t_start = self.step, time.time()
        t_log, step_log = t_start, self.step
        consecutive_skips = 0
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            self.sampler.set_epoch(epoch, start_batch=self.step - epoch * self.steps_per_epoch)
            for views, labels in self.loader:
                views = [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]
                lr = self.lr_at(self.step)
                set_lr(self.optimizer, lr)
                self.probe_tap.armed = self.probe is not None  # the first backbone call: the first online view
                res = train_step(self.model, self.objective, self.optimizer, views, self.target_forward, self.scaler,
                                 self.amp_dtype, stop=self.requeue_signal.pending)
                self.probe_tap.armed = False
                if self.probe is not None and res.finite:
                    self.probe.step(self.probe_tap.output, labels.to(self.device, non_blocking=True))
                self.probe_tap.output = None
                if not res.finite:
                    consecutive_skips += 1
                    self._on_nonfinite(res, lr, consecutive_skips)
                else:
                    consecutive_skips = 0
                momentum = None
                if self.target is not None and res.finite:
                    momentum = self.momentum_at(self.step)
                    ema_update(self.target, self.net, momentum)
                self.step += 1
                last = self.step >= self.total_steps
                want_spectrum = last or (cfg.spectrum_every and self.step % cfg.spectrum_every == 0)
                spectrum = None
                if want_spectrum and res.finite:
                    spectrum = self._spectrum(res.online[0])
                # The same decision on every process (the probe's count is a collective): not ``spectrum``, rank 0's.
                if last or self.step % cfg.log_every == 0 or (want_spectrum and res.finite):
                    now = time.time()
                    ips = (self.step - step_log) * self.global_batch / max(now - t_log, 1e-9)
                    eta = (now - t_start) / max(self.step - start_step, 1) * (self.total_steps - self.step)
                    probe_top1 = self.probe.take_train_top1() if self.probe is not None else None
                    self._log(res, lr, momentum, ips, eta, spectrum, probe_top1)
                    t_log, step_log = now, self.step
                self._monitor(last)  # before a checkpoint of this step, so a resume from it keeps the figures
                if last:
                    break  # the final checkpoint (finished) is _finish's
                self._checkpoint_if_due(signalled=res.stop)

    def _checkpoint_if_due(self, signalled: bool) -> None:
        """At a step boundary before the last: last.pth every ``train.ckpt_every_steps`` steps, at every epoch end
        (with a snapshot every ``train.keep_every_epochs`` epochs), and when the requeue signal came (then the
        signal is handed on)."""
        cfg = self.cfg.train
        epochs_done, in_epoch = divmod(self.step, self.steps_per_epoch)
        snapshot = in_epoch == 0 and bool(cfg.keep_every_epochs) and epochs_done % cfg.keep_every_epochs == 0
        periodic = bool(cfg.ckpt_every_steps) and self.step % cfg.ckpt_every_steps == 0
        if periodic or in_epoch == 0 or signalled:
            self.save(snapshot=snapshot)
        if signalled:
            self._hand_on_requeue_signal()

    def _hand_on_requeue_signal(self) -> None:
        """Every rank is at this boundary (the stop is decided in the step's collective) and rank 0 has written
        last.pth: now the deferred signal's own handler runs (submitit's: checkpoint() and requeue on rank 0,
        nothing on the others, which go on until the requeue ends the job, as before)."""
        barrier()
        name = self.requeue_signal.signum.name
        if self.requeue_signal.has_handler:
            log.warning("time-out signal (%s) at step %d: checkpoint written, requeueing", name, self.step)
        if not self.requeue_signal.deliver():
            raise RunInterrupted(
                f"stopped by {name} at step {self.step}/{self.total_steps}: checkpoint {self.ckpt_path} written; "
                f"started again (the same command), the run resumes from step {self.step}")

    def _spectrum(self, z_local: torch.Tensor) -> dict | None:
        with torch.no_grad():
            z = gather_with_grad(z_local.detach().float())
        if not self.info.is_main:
            return None
        self.last_spectrum = {"step": self.step, **spectrum_metrics(z, int(self.cfg.train.spectrum_topk))}
        return self.last_spectrum

    def _log(self, res: StepOutput, lr: float, momentum: float | None, ips: float, eta: float,
             spectrum: dict | None, probe_top1: float | None = None) -> None:
        if not self.info.is_main:
            return
        parts = {k: _scalar(v) for k, v in res.out.items()}
        parts = {k: v for k, v in parts.items() if v is not None}
        row: dict = {"epoch": self.step / self.steps_per_epoch, **parts, "lr": lr, "images_per_s": ips,
                     "skipped_images": num_skipped(self.dataset), "nonfinite_skips": self.nonfinite_skips}
        if momentum is not None:
            row["ema_momentum"] = momentum
        if probe_top1 is not None:
            row["probe_train_top1"] = probe_top1
        if spectrum is not None:
            row.update({k: v for k, v in spectrum.items() if k != "step"})
        self.logger.log(self.step, **row)
        loss_txt = " ".join(f"{k} {parts[k]:.4f}" for k in ("loss", "align", "trace") if k in parts)
        extra = f" m {momentum:.5f}" if momentum is not None else ""
        spec = (f" erank {spectrum['effective_rank']:.1f} lgIoC {spectrum['lg_ioc']:.2f}"
                f" cond{len(spectrum['top_eigenvalues'])} {spectrum['condition_topk']:.3g}") if spectrum else ""
        probe = f" probe top-1 {probe_top1:.1f}" if probe_top1 is not None else ""
        log.info("epoch %.2f/%.2f step %d/%d %s lr %.4g%s%s%s | %.1f img/s | ETA %s", self.step / self.steps_per_epoch,
                 self.total_steps / self.steps_per_epoch, self.step, self.total_steps, loss_txt, lr, extra, spec,
                 probe, ips, _fmt_time(eta))

    def _on_nonfinite(self, res: StepOutput, lr: float, consecutive: int) -> None:
        step = self.step + 1
        parts = {k: _scalar(v) for k, v in res.out.items()}
        report: dict = {"step": step, "lr": lr, **{k: v for k, v in parts.items() if v is not None},
                        "last_checkpoint_step": self._ckpt_step(), "last_spectrum": self.last_spectrum}
        try:  # this process's projections that produced the bad loss (no collective on this error path)
            z = res.online[0].detach().float()
            if torch.isfinite(z).all():
                report["spectrum_now"] = spectrum_metrics(z, int(self.cfg.train.spectrum_topk))
            else:
                report["spectrum_now"] = f"projections hold {int((~torch.isfinite(z)).sum())} non-finite values"
        except Exception as e:  # noqa: BLE001 - a failing diagnosis must not hide the real error
            report["spectrum_now"] = f"could not be computed: {type(e).__name__}: {e}"
        mode = self.cfg.train.on_nonfinite
        if self.info.is_main:
            write_json(self.run_dir / f"nonfinite_step{step}.json", report)
        msg = (f"non-finite loss ({report.get('loss')}) at step {step}; parts and spectrum in "
               f"{self.run_dir / f'nonfinite_step{step}.json'}")
        if mode == "skip" and consecutive <= MAX_CONSECUTIVE_SKIPS:
            self.nonfinite_skips += 1
            log.warning("%s; batch skipped (train.on_nonfinite=skip), no weight or batch-norm statistic was changed",
                        msg)
            return
        ckpt_step = report["last_checkpoint_step"]
        if ckpt_step is not None:
            kept = f"the last checkpoint {self.ckpt_path} (step {ckpt_step}) is intact"
        elif self.ckpt_path.exists():
            kept = f"the checkpoint {self.ckpt_path} could not be read"
        else:
            kept = f"no checkpoint was written yet ({self.ckpt_path} does not exist)"
        if mode == "skip":
            why = f"{consecutive} consecutive non-finite losses with train.on_nonfinite=skip: the run has diverged"
            fix = "lower optim.base_lr (or method.beta), or train.amp=bf16 or off"
        else:
            why = "train.on_nonfinite=stop"
            fix = "lower optim.base_lr, train.amp=bf16 or off, or train.on_nonfinite=skip to skip such batches"
        raise NonFiniteLossError(f"{msg}. Stopped ({why}) before updating any weight; {kept}. Fix: {fix}")

    def _ckpt_step(self) -> int | None:
        if not self.ckpt_path.exists():
            return None
        try:
            return int(load_checkpoint(self.ckpt_path)["step"])
        except Exception:  # noqa: BLE001
            return None

    # ------------------------------------------------------------------ end of the run
    def _finish(self) -> dict:
        self.save(finished=True)
        summary, unreadable = None, unreadable_files_all_ranks(self.dataset, self.info.device)  # a collective
        if self.info.is_main:
            self._remove_stale_temporaries()
            write_unreadable_list(self.run_dir, {"train": unreadable})
            rows = runlog.read_metrics(self.run_dir)
            topk = int(self.cfg.train.spectrum_topk)
            plot_spectrum(rows, self.run_dir / "spectrum.png")
            plot_top_eigenvalues(rows, self.run_dir / "spectrum_topk.png", topk)
            plot_loss(rows, self.run_dir / "loss.png")
            plot_monitor(rows, self.run_dir / "monitor.png")
            last = next((r for r in reversed(rows) if "loss" in r), {})
            latest = {k: next((r[k] for r in reversed(rows) if k in r), None)
                      for k in ("probe_train_top1", "probe_val_top1", "knn_top1")}
            spec = self.last_spectrum or next((r for r in reversed(rows) if "effective_rank" in r), {})
            k_seen = min(topk, len(spec.get("top_eigenvalues") or [])) or topk  # a batch of m gives m - 1 at most
            summary = {
                "run_dir": str(self.run_dir), "checkpoint": str(self.ckpt_path), "steps": self.step,
                "epochs": self.step / self.steps_per_epoch, "final_loss": last.get("loss"),
                "effective_rank": spec.get("effective_rank"), "lg_ioc": spec.get("lg_ioc"),
                "spectrum_topk": topk, "condition_topk": spec.get("condition_topk"),
                "entropy_topk": spec.get("entropy_topk"), "eigenvalue_saturation_step": saturation_step(rows, k_seen),
                "world_size": self.info.world_size, "global_batch": self.global_batch,
                "skipped_images": len(unreadable), "nonfinite_skips": self.nonfinite_skips,
                "checkpoint_fallbacks": [r["checkpoint_fallback"] for r in rows if "checkpoint_fallback" in r],
                **{k: v for k, v in latest.items() if v is not None},
            }
            summary = runlog.mark_complete(self.run_dir, summary)  # adds the run's provenance
            log.info("finished: %d steps; final loss %s; checkpoint %s", self.step, summary["final_loss"],
                     self.ckpt_path)
        barrier()
        return summary
