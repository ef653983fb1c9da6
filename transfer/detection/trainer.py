"""The detectron2 trainer for detection transfer: DefaultTrainer with what CPU processes and checks need.

Differences from detectron2's DefaultTrainer, each for a reason:
- DDP wraps the model with ``device_ids`` only on CUDA (detectron2's create_ddp_model always passes the
  local rank, which DDP rejects for a CPU module), so the same code runs as gloo CPU processes;
- mixed precision (SOLVER.AMP.ENABLED) is detectron2's AMPTrainer (fp16) on CUDA and a bf16
  ``torch.autocast("cpu")`` forward on CPU (AMPTrainer asserts CUDA);
- checkpoints are written atomically (fvcore writes them in place) and loading initial weights checks
  the backbone keys (transfer.detection.weights);
- evaluation is COCOEvaluator (bbox, and segm when MASK_ON) or detectron2's VOC evaluator.
"""

from __future__ import annotations

import logging
import os
import time
import weakref

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from torch.nn.parallel import DistributedDataParallel

from common.atomic import atomic_torch_save, atomic_write_text
from common.distributed import get_world_size
from common.runlog import MetricsLogger
from transfer.detection.weights import CheckedDetectionCheckpointer

logger = logging.getLogger("transfer.detection")


class AtomicCheckedCheckpointer(CheckedDetectionCheckpointer):
    """Same files and ``last_checkpoint`` tag as fvcore's Checkpointer, written via temp file + rename."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)


class CPUAutocastTrainer(SimpleTrainer):
    """SimpleTrainer whose forward runs under bf16 autocast on CPU (backward and step in fp32 params)."""

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    if get_world_size() == 1:
        return model
    if next(model.parameters()).is_cuda:
        return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()], broadcast_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


class LossLog(HookBase):
    """Every iteration's losses and lr into the run's metrics.jsonl (rank 0; appended, so resumes continue it).

    detectron2's JSONWriter keeps only one smoothed row per 20 iterations; the loss curve and the
    "does it learn" check want every step.
    """

    def __init__(self, output_dir: str, enabled: bool):
        self.output_dir, self.enabled, self.log = output_dir, enabled, None

    def before_train(self):
        self.log = MetricsLogger(self.output_dir, enabled=self.enabled, tensorboard=False)

    def after_step(self):
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        row = {k: float(v) for k, (v, i) in latest.items()
               if i == it and (k == "total_loss" or k == "lr" or k.startswith("loss_"))}
        if row:
            self.log.log(it, **row)

    def after_train(self):
        if self.log is not None:
            self.log.close()


class Trainer(DefaultTrainer):
    """DefaultTrainer (hooks, PreciseBN, periodic checkpoints, EvalHook, writers) built for any device."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ hard-codes create_ddp_model and AMPTrainer; the same steps, device-aware.
        TrainerBase.__init__(self)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(model)
        if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE != "cpu":
            step_trainer = AMPTrainer(model, data_loader, optimizer)
        elif cfg.SOLVER.AMP.ENABLED:
            step_trainer = CPUAutocastTrainer(model, data_loader, optimizer)
        else:
            step_trainer = SimpleTrainer(model, data_loader, optimizer)
        self._trainer = step_trainer
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckedCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        from detectron2.engine.hooks import PeriodicCheckpointer
        from detectron2.utils import comm

        ret = super().build_hooks()
        keep = int(self.cfg.INTL.MAX_CHECKPOINTS_TO_KEEP)
        for h in ret:
            if isinstance(h, PeriodicCheckpointer) and keep > 0:
                h.max_to_keep = keep  # fvcore's own option; DefaultTrainer keeps every periodic checkpoint
        return ret + [LossLog(self.cfg.OUTPUT_DIR, comm.is_main_process())]

    def build_writers(self):
        """detectron2's default writers (console with ETA, metrics.json), TensorBoard under tb/ like every stage."""
        from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

        out = self.cfg.OUTPUT_DIR
        return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(out, "metrics.json")),
                TensorboardXWriter(os.path.join(out, "tb"))]

    @classmethod
    def build_model(cls, cfg):
        from detectron2.modeling import build_model

        model = build_model(cfg)
        n = sum(p.numel() for p in model.parameters())
        logger.info("model: %s with %s, %.1fM parameters", cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.ROI_HEADS.NAME,
                    n / 1e6)
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if getattr(MetadataCatalog.get(dataset_name), "evaluator_type", "") == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_folder, use_fast_impl=True)

    def train(self):
        """Trains from ``start_iter`` (evaluating at the end) and returns the last evaluation results."""
        super().train()
        return getattr(self, "_last_eval_results", None)
