"""The pretraining network: ResNet backbone + projector, SyncBN conversion, the momentum (EMA) copy.

``SSLNetwork`` holds ``backbone`` (a torchvision ResNet without ``fc``, pretrain/backbones.py) and
``projector``, so its state_dict keys are ``backbone.<torchvision key>`` and ``projector.<i>.<...>``: the
checkpoint layout of DESIGN.md. Its forward takes the list of views of one batch and returns one
projection per view; every view goes through the network on its own (batch-norm statistics per view,
as in the paper's code), and multi-crop views of different sizes are fine.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from common.distributed import gather_with_grad, is_dist
from common.resnet import build_resnet


def build_projector(in_dim: int, sizes: Sequence[int]) -> nn.Sequential:
    """N linear layers ``in_dim -> sizes[0] -> ... -> sizes[-1]``.

    Hidden layers are Linear (no bias: BN follows) + BatchNorm1d + ReLU; the last layer is a plain
    Linear with bias (the paper's projector: 3 x 8192).
    """
    sizes = [int(s) for s in sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"model.projector must be a non-empty list of positive layer sizes, got {sizes}; "
                         "fix: e.g. model.projector=[8192,8192,8192]")
    layers: list[nn.Module] = []
    dims = [int(in_dim), *sizes]
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


class SSLNetwork(nn.Module):
    """Backbone + projector; ``forward(views) -> [projection of each view]``."""

    def __init__(self, arch: str, projector: Sequence[int], small_stem: bool = False,
                 zero_init_residual: bool | None = None):
        super().__init__()
        self.backbone = build_resnet(arch, small_stem=small_stem, zero_init_residual=zero_init_residual)
        self.projector = build_projector(self.backbone.feature_dim, projector)

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.projector(self.backbone(v)) for v in views]


def build_network(cfg_model) -> SSLNetwork:
    return SSLNetwork(arch=cfg_model.arch, projector=list(cfg_model.projector),
                      small_stem=bool(cfg_model.small_stem), zero_init_residual=cfg_model.zero_init_residual)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose statistics cover the batch of every process: SyncBN for the gloo (CPU) backend.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors, and the engine must behave the same on CPU processes
    as on GPUs, so this is the CPU counterpart (on CUDA the engine uses torch's SyncBatchNorm). One collective
    per layer and direction, as torch's SyncBatchNorm: every process computes its count, mean and sum of
    squared deviations (two passes over its own batch), the three are all-gathered in one tensor
    (``common.distributed.gather_with_grad``, whose backward is one all-reduce), and combined by Chan et al.'s
    pairwise formula, M2 = sum M2_r + sum n_r (mean_r - mean)^2, which never subtracts two large sums: in
    float32 its error grows like ulp(|mean|) / std, where the one-pass E[x^2] - E[x]^2 loses ulp(mean^2) / var
    (every digit when |mean| >> std; tests/pretrain/test_step_collectives.py). The result equals batch norm
    over the concatenated batch, forward and backward. Same parameters and buffers as BatchNorm (identical
    state_dict keys).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected a 2D-5D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # fp16/bf16: stats in fp32
        n_local = x.numel() // x.shape[1]
        mean_local = xf.mean(dim=dims)
        m2_local = (xf - mean_local.view(shape)).pow(2).sum(dim=dims)
        count = torch.full((1,), float(n_local), dtype=xf.dtype, device=x.device)
        stats = gather_with_grad(torch.cat([count, mean_local, m2_local]).unsqueeze(0))  # world x (1 + 2C)
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + x.shape[1]], stats[:, 1 + x.shape[1]:]
        total = counts.sum()
        mean = (counts * means).sum(dim=0) / total
        var = (m2s.sum(dim=0) + (counts * (means - mean).pow(2)).sum(dim=0)) / total  # biased, to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * total / (total - 1).clamp(min=1)  # on the device: no host sync
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm*d -> a batch norm over the global batch (torch's SyncBatchNorm on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


def make_momentum_copy(online: nn.Module) -> nn.Module:
    """The EMA (momentum) network: a frozen copy of the online network."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for parameters.

    The target's batch-norm buffers are its own: it runs in training mode on crop 0 and tracks them.
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)
