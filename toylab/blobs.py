"""Toy lab: the 2-D Gaussian-blobs Siamese toy of the paper's Appendix D.1.

512 two-dimensional points drawn from Gaussian blobs, a 3-layer MLP 2-16-16-2 (BN + ReLU on the hidden
layers), batch 32, SGD lr 0.1, two views made by adding Gaussian noise. The MLP output (m x 2) goes
through a spectral transformation along the batch axis (d = 2, so the 2 x 2 covariance is the one that
matters) and the views are aligned with the normalised MSE of ``pretrain.losses``. Swept:

- the power family Sigma^-p (``st_power``) over p,
- IterNorm over T without the trace loss (``iternorm_only``) and with it (``intl``).

For every run the eigenvalues of the covariance of the transformed output (the quantity Theorem 1 and
Figures 2/6 are about) and of the MLP output itself, both on all 512 points, are recorded over training;
the effective rank of the transformed output at the end says whether a dimension collapsed. One command writes
the figures and tables::

    python -m toylab.blobs --out outputs/toylab

The same sweep on the embedded image set (short pretrainings by the engine, then effective rank, lgIoC and
k-NN accuracy per variant) is ``python -m toylab.images``.

``outputs/toylab/``: ``power_outputs.png`` / ``iternorm_outputs.png`` (the transformed output of every
point at the end, as in Figure 2(a)), ``power_eigenvalues.png`` / ``iternorm_eigenvalues.png`` (both
eigenvalues over training, log scale, as in Figure 6), ``results.json`` and ``results.md`` (final
eigenvalues, effective rank, lgIoC per run).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from common.atomic import atomic_write_text, save_figure, write_json
from pretrain import losses
from pretrain.spectrum import covariance_spectrum, effective_rank, lg_ioc


@dataclass(frozen=True)
class ToyConfig:
    """One toy run. kind: "power" (Sigma^-p), "iternorm" (T = iters, trace loss weight beta)."""

    kind: str = "iternorm"
    power: float = 0.5
    iters: int = 4
    beta: float = 0.0
    epochs: int = 150
    n_points: int = 512
    n_blobs: int = 4
    batch_size: int = 32
    lr: float = 0.1
    noise: float = 0.1
    hidden: int = 16
    seed: int = 0
    record_every: int = 16  # steps between spectrum records

    @property
    def label(self) -> str:
        if self.kind == "power":
            return f"p={self.power:g}"
        return f"T={self.iters}" + (f" +TL({self.beta:g})" if self.beta else "")


@dataclass
class ToyResult:
    config: ToyConfig
    steps: list[int] = field(default_factory=list)
    eigenvalues: list[list[float]] = field(default_factory=list)  # transformed output, descending, per record
    embedding_eigenvalues: list[list[float]] = field(default_factory=list)  # MLP output, per record
    final_output: torch.Tensor | None = None  # transformed output of all points, (n, 2)
    final_embedding: torch.Tensor | None = None  # MLP output of all points, (n, 2)
    loss: list[float] = field(default_factory=list)

    @property
    def final_eigenvalues(self) -> list[float]:
        return self.eigenvalues[-1]

    @property
    def effective_rank(self) -> float:
        return effective_rank(self.final_eigenvalues)

    @property
    def embedding_effective_rank(self) -> float:
        return effective_rank(self.embedding_eigenvalues[-1])

    @property
    def lg_ioc(self) -> float:
        return lg_ioc(self.final_eigenvalues)

    def summary(self) -> dict:
        return {"label": self.config.label, **{k: v for k, v in asdict(self.config).items()},
                "final_eigenvalues": self.final_eigenvalues, "effective_rank": self.effective_rank,
                "lg_ioc": self.lg_ioc, "embedding_effective_rank": self.embedding_effective_rank,
                "final_embedding_eigenvalues": self.embedding_eigenvalues[-1],
                "final_loss": self.loss[-1] if self.loss else None}


def make_blobs(n_points: int, n_blobs: int, generator: torch.Generator) -> torch.Tensor:
    """n_points 2-D points from n_blobs isotropic Gaussians with centres on a random layout."""
    centres = torch.rand(n_blobs, 2, generator=generator) * 8 - 4
    labels = torch.arange(n_points) % n_blobs
    return centres[labels] + 0.5 * torch.randn(n_points, 2, generator=generator)


def make_mlp(hidden: int = 16) -> nn.Sequential:
    """2-16-16-2 with BN + ReLU on the two hidden layers."""
    return nn.Sequential(nn.Linear(2, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, 2))


def transform(z: torch.Tensor, cfg: ToyConfig) -> torch.Tensor:
    if cfg.kind == "power":
        return losses.power_transform(z, cfg.power, axis="batch")
    if cfg.kind == "iternorm":
        return losses.iternorm(z, cfg.iters, axis="batch")
    raise ValueError(f"unknown toy kind {cfg.kind!r}; use 'power' or 'iternorm'")


def toy_loss(z1: torch.Tensor, z2: torch.Tensor, cfg: ToyConfig) -> torch.Tensor:
    """Symmetric two-view loss: norm_mse of the transformed views (+ beta * trace losses)."""
    t1, t2 = transform(z1, cfg), transform(z2, cfg)
    loss = losses.norm_mse(t1, t2)
    if cfg.beta:
        loss = loss + cfg.beta * (losses.trace_loss(t1, "batch") + losses.trace_loss(t2, "batch"))
    return loss


def run_toy(cfg: ToyConfig) -> ToyResult:
    """Trains the toy MLP; records the output covariance eigenvalues on all points every few steps."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = make_blobs(cfg.n_points, cfg.n_blobs, gen)
    torch.manual_seed(cfg.seed)
    model = make_mlp(cfg.hidden).double()
    x = x.double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    result = ToyResult(cfg)
    n_batches = cfg.n_points // cfg.batch_size

    def record(step: int) -> None:
        model.eval()
        with torch.no_grad():
            z = model(x)
            t = transform(z, cfg)
        model.train()
        result.steps.append(step)
        result.eigenvalues.append(covariance_spectrum(t).tolist())
        result.embedding_eigenvalues.append(covariance_spectrum(z).tolist())

    step = 0
    record(step)
    for _ in range(cfg.epochs):
        perm = torch.randperm(cfg.n_points, generator=gen)
        for b in range(n_batches):
            xb = x[perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            v1 = xb + cfg.noise * torch.randn(xb.shape, generator=gen, dtype=xb.dtype)
            v2 = xb + cfg.noise * torch.randn(xb.shape, generator=gen, dtype=xb.dtype)
            loss = toy_loss(model(v1), model(v2), cfg)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"toy run {cfg.label}: loss became {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            result.loss.append(float(loss))
            if step % cfg.record_every == 0:
                record(step)
    if result.steps[-1] != step:
        record(step)
    model.eval()
    with torch.no_grad():
        z = model(x)
        result.final_embedding = z
        result.final_output = transform(z, cfg)
    return result


# ------------------------------------------------------------------------------------------------------
# sweeps, plots, tables
# ------------------------------------------------------------------------------------------------------
DEFAULT_POWERS = (0.0, 0.25, 0.45, 0.5, 0.55, 0.75, 1.0, 1.5)
DEFAULT_ITERS = (1, 3, 5, 7)
DEFAULT_BETA = 0.01


def sweep(powers=DEFAULT_POWERS, iters=DEFAULT_ITERS, beta: float = DEFAULT_BETA, epochs: int = 150,
          seed: int = 0, progress: bool = True) -> dict[str, list[ToyResult]]:
    """Runs the power sweep and the IterNorm sweep (each T without and with the trace loss)."""
    configs = {"power": [ToyConfig(kind="power", power=p, epochs=epochs, seed=seed) for p in powers],
               "iternorm": [ToyConfig(kind="iternorm", iters=t, beta=b, epochs=epochs, seed=seed)
                            for b in (0.0, beta) for t in iters]}
    total = sum(len(v) for v in configs.values())
    out: dict[str, list[ToyResult]] = {k: [] for k in configs}
    done, start = 0, time.time()
    for family, cfgs in configs.items():
        for cfg in cfgs:
            res = run_toy(cfg)
            out[family].append(res)
            done += 1
            if progress:
                eta = (time.time() - start) / done * (total - done)
                eig = ", ".join(f"{e:.3g}" for e in res.final_eigenvalues)
                print(f"[toylab {done}/{total}] {cfg.label:>14}: eigenvalues [{eig}] erank "
                      f"{res.effective_rank:.3f} lgIoC {res.lg_ioc:.2f}  (ETA {eta:.0f}s)", flush=True)
    return out


def plot_outputs(results: list[ToyResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    labels = torch.arange(results[0].config.n_points) % results[0].config.n_blobs
    for ax, res in zip(axes.flat, results):
        out = res.final_output.cpu()
        ax.scatter(out[:, 0], out[:, 1], c=labels, s=4, cmap="tab10")
        ax.set_title(f"{res.config.label}\nerank {res.effective_rank:.2f}", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_eigenvalues(results: list[ToyResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, res in zip(axes.flat, results):
        eig = torch.tensor(res.eigenvalues).clamp(min=1e-16)
        emb = torch.tensor(res.embedding_eigenvalues).clamp(min=1e-16)
        for i in range(eig.shape[1]):
            line, = ax.semilogy(res.steps, eig[:, i], label=f"output lambda{i + 1}")
            ax.semilogy(res.steps, emb[:, i], "--", color=line.get_color(), alpha=0.5,
                        label=f"embedding lambda{i + 1}")
        ax.set_title(res.config.label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def results_table(results: dict[str, list[ToyResult]]) -> str:
    lines = ["Eigenvalues of the transformed output's covariance on all points at the end of training "
             "(effective rank 2 = both dimensions kept, 1 = one collapsed); last column: the MLP output's.", "",
             "| family | run | lambda1 | lambda2 | effective rank | lgIoC | embedding effective rank |",
             "|---|---|---|---|---|---|---|"]
    for family, runs in results.items():
        for r in runs:
            e = r.final_eigenvalues
            lines.append(f"| {family} | {r.config.label} | {e[0]:.4g} | {e[-1]:.4g} | "
                         f"{r.effective_rank:.3f} | {r.lg_ioc:.2f} | {r.embedding_effective_rank:.3f} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, list[ToyResult]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [
        plot_outputs(results["power"], out / "power_outputs.png", "Spectral transformation Sigma^-p: output"),
        plot_eigenvalues(results["power"], out / "power_eigenvalues.png",
                         "Sigma^-p: eigenvalues of the output (solid) and embedding (dashed) covariance"),
        plot_outputs(results["iternorm"], out / "iternorm_outputs.png", "IterNorm (T) with/without trace loss"),
        plot_eigenvalues(results["iternorm"], out / "iternorm_eigenvalues.png",
                         "IterNorm: eigenvalues of the output (solid) and embedding (dashed) covariance"),
        write_json(out / "results.json", {k: [r.summary() for r in v] for k, v in results.items()}),
        atomic_write_text(out / "results.md", "# Toy lab (paper Appendix D.1)\n\n" + results_table(results)),
    ]
    return files


def _float_list(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toylab.blobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/toylab", help="output folder (default outputs/toylab)")
    parser.add_argument("--powers", default=",".join(f"{p:g}" for p in DEFAULT_POWERS),
                        help="comma-separated powers p of Sigma^-p")
    parser.add_argument("--iters", default=",".join(str(t) for t in DEFAULT_ITERS),
                        help="comma-separated IterNorm iteration counts T")
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA, help="trace-loss weight of the INTL runs")
    parser.add_argument("--epochs", type=int, default=150, help="epochs of 16 steps (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 2 x 16 matrices: extra threads only add contention
    try:
        powers = _float_list(args.powers)
        iters = [int(t) for t in _float_list(args.iters)]
    except ValueError:
        print(f"error: --powers/--iters must be comma-separated numbers, got {args.powers!r} / {args.iters!r}",
              file=sys.stderr)
        return 2
    if not powers or not iters or any(t < 1 for t in iters) or args.epochs < 1 or args.beta <= 0:
        print("error: need at least one power and one T >= 1, --epochs >= 1 and --beta > 0", file=sys.stderr)
        return 2
    results = sweep(powers, iters, args.beta, args.epochs, args.seed)
    files = write_outputs(results, Path(args.out))
    print(results_table(results))
    print("wrote:\n" + "\n".join(f"  {f}" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
