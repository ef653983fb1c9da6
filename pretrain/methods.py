"""Registry of SSL objectives: method name -> loss module, with the method's config validated up front.

The engine builds the objective once::

    objective = build_method(cfg.method, global_batch=cfg.batch_size, world_size=dist_info.world_size)
    out = objective(online_projections, target=momentum_projection_of_crop0 or None)
    out["loss"].backward()

``cfg.method`` is one file of ``configs/method/`` (``method=<name>`` on the command line): a
``name`` plus that method's keys. Unknown names or keys raise ``ValueError`` listing the valid ones.

Views and the EMA target
    Without EMA (``uses_ema`` False): ``online`` holds the projector outputs of all n >= 2 crops of this
    process, crop 0 first. With EMA (``uses_ema`` True): ``target`` is the momentum encoder's projection of
    crop 0 and ``online`` holds the online projections of crops 1..n-1 only (n - 1 >= 1 tensors): crop 0 is
    seen only by the momentum encoder, as in the reference INTL_M.

How each method combines them (the table and the reasons: ``configs/method/README.md``; every rule is
tested against its authors' definition in ``tests/pretrain/test_multiview.py``)
    - intl, iternorm_only, trace_only, st_power, barlow_twins, vicreg: INTL's rule
      (github.com/winci-ai/INTL methods/intl.py, methods/intl_m.py; ``losses.combine_views``): every crop
      paired with crop 0 and the pair losses averaged, crop 0's regulariser in every pair; with EMA the
      online crops paired with the momentum crop 0, the regulariser (trace loss, VICReg's variance and
      covariance) on the online crops only. For 2 crops Barlow Twins and VICReg are their authors' losses;
      their authors define no more than 2 views (solo-learn's solo/methods/barlow_twins.py and vicreg.py
      unpack exactly two), so V > 2 and EMA use INTL's rule, our choice.
    - frossl: its authors' rule (github.com/OFSkean/FroSSL solo/losses/frossl.py, solo/methods/frossl.py):
      2 crops the two-view form (features centred), more the multi-view form (not centred, every view's
      log-Frobenius term with weight 1, the invariance summed over all pairs); with EMA the same over the
      momentum crop 0 and the online crops, crop 0's regulariser (no gradient) left out.

Distributed semantics
    Every view (and the target) is all-gathered with ``common.distributed.gather_with_grad`` before
    whitening, so the loss is computed on the global batch and has the same value on every rank, equal to
    the one-process loss on the concatenated batch. gather_with_grad's backward SUMS the gradients of the
    W identical rank losses, so each rank's local input receives W times its slice of the one-process
    gradient; DDP's 1/W gradient averaging then yields exactly the one-process parameter gradient
    (tests/pretrain/test_methods.py checks this with 2 gloo processes).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from common.distributed import gather_with_grad
from pretrain import losses

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    METHODS[cls.name] = cls
    return cls


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Objective(nn.Module):
    """Base class: validates the config, gathers the views, calls ``compute``.

    Subclasses set ``name``, ``defaults`` (every accepted key with its default) and implement
    ``compute(views, target) -> dict`` on global-batch tensors.
    """

    name = ""
    defaults: dict[str, Any] = {"ema": False}

    def __init__(self, cfg: Mapping[str, Any], global_batch: int, world_size: int = 1):
        super().__init__()
        self.cfg = {**self.defaults, **{k: v for k, v in cfg.items() if k != "name"}}
        self.global_batch = int(global_batch)
        self.world_size = int(world_size)
        if not isinstance(self.cfg["ema"], bool):
            raise ValueError(f"method.ema must be true or false, got {self.cfg['ema']!r}")
        self.uses_ema = self.cfg["ema"]
        self.validate()

    # -- config checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Checks the values of the method's keys; raises ValueError naming the key and the fix."""

    def _check(self, ok: bool, key: str, want: str) -> None:
        if not ok:
            raise ValueError(f"method={self.name}: {key}={self.cfg[key]!r} is invalid; expected {want}")

    def _check_axis(self, key: str = "axis") -> None:
        self._check(self.cfg[key] in losses.AXES, key, f"one of {list(losses.AXES)}")

    def _check_beta(self, key: str = "beta") -> None:
        v = self.cfg[key]
        self._check(v is None or (_is_number(v) and v >= 0 and math.isfinite(v)), key,
                    "null (the paper's 0.01*(log2(N)-3)) or a number >= 0")

    def _beta(self, value: float | None, axis: str, dim: int) -> float:
        if value is not None:
            return float(value)
        beta = losses.intl_beta(self.global_batch, dim, axis)
        if beta < 0:
            what = f"global batch {self.global_batch}" if axis == "channel" else f"embedding dim {dim}"
            raise ValueError(f"method={self.name}: the paper's rule beta = 0.01*(log2(N)-3) is negative for "
                             f"{what} < 8; set method.beta to a number >= 0")
        return beta

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, online: Sequence[torch.Tensor], target: torch.Tensor | None = None) -> dict:
        if isinstance(online, torch.Tensor) or not isinstance(online, (list, tuple)):
            raise TypeError("online must be a list of (batch, dim) tensors, one per view")
        if self.uses_ema and target is None:
            raise ValueError(f"method={self.name} has ema=true: pass target= the momentum encoder's "
                             "projection of crop 0")
        if not self.uses_ema and target is not None:
            raise ValueError(f"method={self.name} has ema=false but a target was passed; set method.ema=true "
                             "or pass every crop in online")
        need = 1 if self.uses_ema else 2
        if len(online) < need:
            raise ValueError(f"method={self.name} needs at least {need} online view(s), got {len(online)}")
        tensors = list(online) + ([target] if target is not None else [])
        dims = {t.shape[-1] for t in tensors}
        if any(t.dim() != 2 for t in tensors) or len(dims) != 1:
            raise ValueError("every view must be a (batch, dim) tensor with the same dim, got shapes "
                             f"{[tuple(t.shape) for t in tensors]}")
        views = [gather_with_grad(v) for v in online]
        tgt = gather_with_grad(target.detach()) if target is not None else None
        return self.compute(views, tgt)

    def compute(self, views: list[torch.Tensor], target: torch.Tensor | None) -> dict:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.cfg.items())


@register
class INTL(Objective):
    """IterNorm (T = iters) + trace loss; ``beta: null`` -> 0.01 (log2(global batch) - 3) (channel)."""

    name = "intl"
    defaults = {"iters": 4, "axis": "channel", "beta": None, "ema": False, "fused": False}

    def validate(self) -> None:
        self._check(isinstance(self.cfg["iters"], int) and not isinstance(self.cfg["iters"], bool)
                    and self.cfg["iters"] >= 1, "iters", "an integer >= 1 (the paper uses 4)")
        self._check_axis()
        if "beta" in self.cfg:
            self._check_beta()
        self._check(isinstance(self.cfg["fused"], bool) and not (self.cfg["fused"] and self.cfg["axis"] != "channel"),
                    "fused", "true or false, and true only with axis=channel (the objective from Gram matrices)")

    def compute(self, views, target):
        beta = self._beta(self.cfg["beta"], self.cfg["axis"], views[0].shape[1])
        return losses.intl_loss(views, target, iters=self.cfg["iters"], axis=self.cfg["axis"], beta=beta,
                                fused=self.cfg["fused"])


@register
class IterNormOnly(INTL):
    """Ablation: IterNorm without the trace loss (beta = 0)."""

    name = "iternorm_only"
    defaults = {"iters": 4, "axis": "channel", "ema": False, "fused": False}

    def compute(self, views, target):
        return losses.intl_loss(views, target, iters=self.cfg["iters"], axis=self.cfg["axis"], beta=0.0,
                                fused=self.cfg["fused"])


@register
class TraceOnly(Objective):
    """Ablation: trace loss on the centred (not whitened) embedding + norm_mse."""

    name = "trace_only"
    defaults = {"axis": "channel", "beta": None, "ema": False}

    def validate(self) -> None:
        self._check_axis()
        self._check_beta()

    def compute(self, views, target):
        beta = self._beta(self.cfg["beta"], self.cfg["axis"], views[0].shape[1])
        return losses.intl_loss(views, target, axis=self.cfg["axis"], beta=beta, whiten=False)


@register
class STPower(Objective):
    """Spectral transformation lambda^-power by eigendecomposition; power 0.5 = hard whitening (W-MSE).
    INTL's multi-view rule (it is the INTL paper's ablation; W-MSE itself averages over all view pairs)."""

    name = "st_power"
    defaults = {"power": 0.5, "axis": "channel", "eps": 1e-6, "ema": False}

    def validate(self) -> None:
        self._check(_is_number(self.cfg["power"]) and math.isfinite(self.cfg["power"]), "power", "a number")
        self._check_axis()
        self._check(_is_number(self.cfg["eps"]) and 0 < self.cfg["eps"] < 1, "eps", "a number in (0, 1)")

    def compute(self, views, target):
        return losses.st_power_loss(views, target, power=float(self.cfg["power"]), axis=self.cfg["axis"],
                                    eps=float(self.cfg["eps"]))


@register
class FroSSL(Objective):
    """FroSSL by its authors' rule: 2 crops the two-view form (centred), V > 2 the multi-view form (not
    centred; every log-Frobenius term weight 1, invariance over all V(V-1)/2 pairs); ``losses.frossl_loss``."""

    name = "frossl"
    defaults = {"ema": False}

    def compute(self, views, target):
        return losses.frossl_loss(views, target)


class _WithTrace(Objective):
    def validate(self) -> None:
        self._check(isinstance(self.cfg["trace"], bool), "trace", "true or false")
        self._check_beta()
        self._check_axis("trace_axis")

    def _trace_beta(self, dim: int) -> float:
        if not self.cfg["trace"]:
            return 0.0
        return self._beta(self.cfg["beta"], self.cfg["trace_axis"], dim)


@register
class BarlowTwins(_WithTrace):
    """Barlow Twins (lambda 0.0051); ``trace: true`` adds beta * trace loss (paper's Table 13). 2 crops: the
    authors' loss; more crops and EMA: INTL's rule (the authors define two views only)."""

    name = "barlow_twins"
    defaults = {"lambd": 0.0051, "trace": False, "beta": None, "trace_axis": "channel", "ema": False}

    def validate(self) -> None:
        super().validate()
        self._check(_is_number(self.cfg["lambd"]) and self.cfg["lambd"] >= 0, "lambd", "a number >= 0")

    def compute(self, views, target):
        return losses.barlow_twins_loss(views, target, lambd=float(self.cfg["lambd"]),
                                        trace_beta=self._trace_beta(views[0].shape[1]),
                                        trace_axis=self.cfg["trace_axis"])


@register
class VICReg(_WithTrace):
    """VICReg (25 / 25 / 1); ``trace: true`` adds beta * trace loss (paper's Table 13). 2 crops: the authors'
    loss; more crops and EMA: INTL's rule (the authors define two views only)."""

    name = "vicreg"
    defaults = {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "trace": False, "beta": None,
                "trace_axis": "channel", "ema": False}

    def validate(self) -> None:
        super().validate()
        for k in ("sim_coeff", "std_coeff", "cov_coeff"):
            self._check(_is_number(self.cfg[k]) and self.cfg[k] >= 0, k, "a number >= 0")

    def compute(self, views, target):
        return losses.vicreg_loss(views, target, sim_coeff=float(self.cfg["sim_coeff"]),
                                  std_coeff=float(self.cfg["std_coeff"]), cov_coeff=float(self.cfg["cov_coeff"]),
                                  trace_beta=self._trace_beta(views[0].shape[1]), trace_axis=self.cfg["trace_axis"])


def _to_dict(cfg_method: Any) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg_method):
            return OmegaConf.to_container(cfg_method, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg_method, str):
        return {"name": cfg_method}
    if not isinstance(cfg_method, Mapping):
        raise ValueError(f"method config must be a mapping with a 'name', got {type(cfg_method).__name__}")
    return dict(cfg_method)


def build_method(cfg_method: Any, global_batch: int, world_size: int = 1) -> Objective:
    """Builds the objective named ``cfg_method['name']`` after validating every key.

    global_batch: the batch over ALL processes (the trace-loss weight depends on it);
    world_size: number of processes (global_batch must be divisible by it).
    """
    cfg = _to_dict(cfg_method)
    name = cfg.get("name")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)} "
                         "(choose with method=<name>)")
    cls = METHODS[name]
    unknown = sorted(set(cfg) - set(cls.defaults) - {"name"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for method={name}; valid keys: "
                         f"{['name'] + sorted(cls.defaults)}")
    if not (isinstance(global_batch, int) and global_batch >= 2):
        raise ValueError(f"global_batch must be an integer >= 2, got {global_batch!r}")
    if not (isinstance(world_size, int) and world_size >= 1) or global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}; "
                         "choose a batch_size that is a multiple of the number of processes")
    return cls(cfg, global_batch, world_size)
