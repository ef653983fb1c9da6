"""Toy lab: FroSSL's training-dynamics experiments (Skean et al., Section 5) on the embedded image set.

**Linear regime** (FroSSL's Figure 2 and Eq. 8, after Simon et al. 2023, "On the stepwise nature of SSL"):
a two-layer linear network f(x) = W2 W1 x trained by full-batch gradient descent in float64 from a small
initialisation, on n = 1024 embedded images with two augmented views per image drawn once (the synthetic
preset's view pipeline, ``pretrain.augment``), each 32-px view average-pooled to 8 x 8 and flattened
(192 inputs), centred, scaled so the largest eigenvalue of the input covariance is 1. With
Z_v = f(X_v) / sqrt(n) (n x d, so Z^T Z is the second-moment matrix), three losses:

- ``frossl``: the simplified FroSSL variant ||Z1^T Z1 - I||^2 + ||Z2^T Z2 - I||^2 + ||Z1 - Z2||^2;
- ``barlow``: the Barlow Twins variant of Simon et al. ||C - I||^2 with C = (Z1^T Z2 + Z2^T Z1) / 2 (the
  cross-correlation symmetrised, as in their linear model);
- ``intl``: INTL in the same setting, ``pretrain.losses.intl_loss`` on f(X1), f(X2) (IterNorm, T = 4, along
  the batch axis, as d < n here; the trace loss with its batch-axis weight 0.01 (log2 d - 3)).

Recorded against the effective time t = lr x step: the loss and the eigenvalues of view 1's covariance
(``pretrain.spectrum.covariance_spectrum`` of f(X1)); from those, the saturation time of each of the top
eigenvalues (``pretrain.spectrum.saturation_step``: from there on within 10% of its final value), the
condition number lambda_1 / lambda_k and the entropy of the top k at the end.

**Nonlinear regime** (FroSSL's Figure 3): the real engine (``pretrain.train.run``, the synthetic preset,
ResNet-18) for frossl, vicreg, barlow_twins and intl, a short schedule with ``train.spectrum_every`` small;
the engine's own metrics rows (``top_eigenvalues``, ``condition_topk``, ``entropy_topk``) and its
``eigenvalue_saturation_step`` are reused, not recomputed. Finished runs are reused.

One command, figures + tables::

    python -m toylab.dynamics --out outputs/toylab/dynamics            # both regimes
    python -m toylab.dynamics --quick --skip-nonlinear                 # the test's configuration

``outputs/toylab/dynamics/``: ``linear_loss.png``, ``linear_eigenvalues.png`` (one panel per method),
``nonlinear_eigenvalues.png``, ``results.md`` and ``results.json``; the engine runs under ``runs/``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from common.atomic import atomic_write_text, save_figure, write_json
from common.config import compose_config
from common.imagefolder import RobustImageFolder
from common.runlog import read_metrics
from pretrain import losses
from pretrain.augment import build_view_transform
from pretrain.spectrum import condition_number, covariance_spectrum, eigenvalue_entropy, saturation_step
from pretrain.train import run as pretrain_run
from toylab import split_overrides

LINEAR_METHODS = ("frossl", "barlow", "intl")
LINEAR_LABELS = {"frossl": "FroSSL variant (Eq. 8)", "barlow": "Barlow Twins variant (Simon et al.)",
                 "intl": "INTL (IterNorm + trace loss)"}
NONLINEAR_METHODS = ("frossl", "vicreg", "barlow_twins", "intl")
LEARNED = 1000.0  # an eigenvalue counts as learned when it ends >= 1000 x its initial value


# ------------------------------------------------------------------------------------------------------
# data: two fixed augmented views of n embedded images
# ------------------------------------------------------------------------------------------------------
def load_views(data_root: Path, n: int, pool: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X1, X2), each (n, features) float64: two augmented views of n images of ``data_root``'s train/ and
    val/ folders (a seeded choice), drawn once by the synthetic preset's view pipeline, average-pooled by
    ``pool``, flattened, centred with the mean of both views and scaled so that the largest eigenvalue of
    their joint covariance is 1."""
    aug = compose_config("pretrain", ["pretrain/preset=synthetic"]).data.augment
    transform = build_view_transform(aug)
    parts = [RobustImageFolder(data_root / s, transform) for s in ("train", "val") if (data_root / s).is_dir()]
    images = ConcatDataset(parts)
    if len(images) < n:
        raise ValueError(f"{data_root} has {len(images)} images, fewer than n = {n}; pass a smaller --n")
    torch.manual_seed(seed)  # the view pipeline draws its parameters from torch's global generator
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    v1, v2 = [], []
    for i in order:
        a, b = images[i][0][:2]
        v1.append(F.avg_pool2d(a[None], pool).flatten())
        v2.append(F.avg_pool2d(b[None], pool).flatten())
    x1, x2 = torch.stack(v1).double(), torch.stack(v2).double()
    mean = 0.5 * (x1.mean(0) + x2.mean(0))
    x1, x2 = x1 - mean, x2 - mean
    top = float(covariance_spectrum(torch.cat([x1, x2]))[0])
    return x1 / math.sqrt(top), x2 / math.sqrt(top)


# ------------------------------------------------------------------------------------------------------
# the linear regime
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearConfig:
    """The linear regime's setting (one config for every method; only ``method`` differs)."""

    n: int = 1024
    hidden: int = 64
    dim: int = 4  # embedding dimension d (the top-d eigenvalues are followed)
    init_scale: float = 0.1  # every weight ~ N(0, init_scale^2 / fan_in): the output starts ~1e-5 of its scale
    lr: float = 0.025
    t_max: float = 120.0  # effective time lr x step
    record_every: int = 10  # steps between records
    pool: int = 4
    seed: int = 0


@dataclass
class LinearResult:
    method: str
    t: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eigenvalues: list[list[float]] = field(default_factory=list)  # view 1's covariance, descending, per record
    seconds: float = 0.0

    def rows(self) -> list[dict]:
        """Metrics-style rows (``step`` = record index x record_every) for ``saturation_step``."""
        return [{"step": i, "top_eigenvalues": e} for i, e in enumerate(self.eigenvalues)]

    def learned(self) -> list[bool]:
        """Which of the top-d eigenvalues were learned: they end at least ``LEARNED`` times their initial value
        (the others are still near the small initialisation, or on their way up: "saturating" means nothing
        there)."""
        return [v > 0 and v >= LEARNED * v0 for v, v0 in zip(self.eigenvalues[-1], self.eigenvalues[0])]

    def saturation_times(self) -> list[float | None]:
        """t at which each of the top-d eigenvalues saturates (``pretrain.spectrum.saturation_step``: from
        there on within 10% of its final value); None for an eigenvalue not learned by t_max."""
        rows = self.rows()
        return [None if not ok or (s := saturation_step(rows, k)) is None else self.t[s]
                for k, ok in enumerate(self.learned(), 1)]

    def rise_times(self) -> list[float | None]:
        """t at which each learned eigenvalue first reaches half its final value (Simon et al.'s step time;
        less sensitive than the 10% band to the small drift a later step causes); None if not learned."""
        out = []
        for i, ok in enumerate(self.learned()):
            final = self.eigenvalues[-1][i]
            out.append(next((t for t, e in zip(self.t, self.eigenvalues) if e[i] >= 0.5 * final), None)
                       if ok else None)
        return out

    def summary(self) -> dict:
        e = self.eigenvalues[-1]
        return {"method": self.method, "label": LINEAR_LABELS[self.method], "final_loss": self.loss[-1],
                "final_eigenvalues": e, "learned": sum(self.learned()), "saturation_t": self.saturation_times(),
                "rise_t": self.rise_times(),
                "condition_number": condition_number(e, len(e)), "entropy": eigenvalue_entropy(e, len(e)),
                "seconds": round(self.seconds, 1)}


def linear_loss(method: str, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """The three losses of the linear regime on the outputs f(X1), f(X2) (n x d)."""
    n, d = f1.shape
    if method == "intl":
        return losses.intl_loss([f1, f2], iters=4, axis="batch")["loss"]
    z1, z2 = f1 / math.sqrt(n), f2 / math.sqrt(n)
    eye = torch.eye(d, dtype=f1.dtype)
    if method == "frossl":
        return ((z1.T @ z1 - eye).pow(2).sum() + (z2.T @ z2 - eye).pow(2).sum() + (z1 - z2).pow(2).sum())
    if method == "barlow":
        c = 0.5 * (z1.T @ z2 + z2.T @ z1)
        return (c - eye).pow(2).sum()
    raise ValueError(f"unknown linear method {method!r}; use one of {LINEAR_METHODS}")


def run_linear(method: str, x1: torch.Tensor, x2: torch.Tensor, cfg: LinearConfig) -> LinearResult:
    """Full-batch gradient descent from the same small initialisation for every method."""
    gen = torch.Generator().manual_seed(cfg.seed)
    w1 = (torch.randn(x1.shape[1], cfg.hidden, generator=gen, dtype=torch.float64)
          * cfg.init_scale / math.sqrt(x1.shape[1])).requires_grad_()
    w2 = (torch.randn(cfg.hidden, cfg.dim, generator=gen, dtype=torch.float64)
          * cfg.init_scale / math.sqrt(cfg.hidden)).requires_grad_()
    steps = int(round(cfg.t_max / cfg.lr))
    result = LinearResult(method)
    start = time.time()
    for step in range(steps + 1):
        f1, f2 = x1 @ w1 @ w2, x2 @ w1 @ w2
        loss = linear_loss(method, f1, f2)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"linear {method}: loss became {float(loss)} at step {step} (lower --lr)")
        if step % cfg.record_every == 0 or step == steps:
            result.t.append(step * cfg.lr)
            result.loss.append(float(loss))
            result.eigenvalues.append(covariance_spectrum(f1).tolist())
        if step == steps:
            break
        g1, g2 = torch.autograd.grad(loss, (w1, w2))
        with torch.no_grad():
            w1 -= cfg.lr * g1
            w2 -= cfg.lr * g2
    result.seconds = time.time() - start
    return result


def linear_regime(data_root: Path, cfg: LinearConfig, methods=LINEAR_METHODS, progress: bool = True
                  ) -> dict[str, LinearResult]:
    x1, x2 = load_views(data_root, cfg.n, cfg.pool, cfg.seed)
    out = {}
    for method in methods:
        res = run_linear(method, x1, x2, cfg)
        out[method] = res
        if progress:
            sat = ", ".join("-" if s is None else f"{s:g}" for s in res.saturation_times())
            print(f"[dynamics linear] {method:>7}: loss {res.loss[-1]:.4g}, saturation t [{sat}] "
                  f"({res.seconds:.1f}s)", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------
# the nonlinear regime: the engine's own spectrum metrics
# ------------------------------------------------------------------------------------------------------
def nonlinear_run(method: str, out: Path, data_root: Path, steps: int, every: int, extra: list[str]) -> dict:
    """One engine pretraining (synthetic preset, ResNet-18) of ``method``; its metrics rows and summary."""
    run_dir = out / "runs" / method
    cfg = compose_config("pretrain", ["pretrain/preset=synthetic", f"method={method}", f"data.root={data_root}",
                                      f"run_dir={run_dir}", f"train.max_steps={steps}",
                                      f"train.spectrum_every={every}", f"train.log_every={every}",
                                      "train.online_probe=false", "train.knn_every=0", *extra])
    start = time.time()
    summary = pretrain_run(cfg)
    rows = [r for r in read_metrics(run_dir) if isinstance(r.get("top_eigenvalues"), list)]
    return {"method": method, "steps": summary["steps"], "final_loss": summary["final_loss"],
            "spectrum_topk": summary["spectrum_topk"], "condition_topk": summary["condition_topk"],
            "entropy_topk": summary["entropy_topk"], "saturation_step": summary["eigenvalue_saturation_step"],
            "steps_logged": [r["step"] for r in rows], "top_eigenvalues": [r["top_eigenvalues"] for r in rows],
            "seconds": round(time.time() - start, 1)}


# ------------------------------------------------------------------------------------------------------
# figures and tables
# ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_linear_loss(results: dict[str, LinearResult], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in results.items():
        ax.plot(r.t, r.loss, label=LINEAR_LABELS[m])
    ax.set_xlabel("t = lr x step")
    ax.set_ylabel("loss")
    ax.set_title("Linear regime: loss (full-batch GD, float64, small init)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, bbox_inches="tight")


def _eigen_panel(ax, x, eigs: list[list[float]], title: str, sat=None, xlabel: str = "t = lr x step") -> None:
    cmap = _plt().get_cmap("viridis")
    k = len(eigs[0])
    for i in range(k):
        ax.plot(x, [max(e[i], 1e-16) for e in eigs], color=cmap(i / max(k - 1, 1)), lw=1.2,
                label=f"lambda_{i + 1}" if i in (0, k - 1) else None)
    if sat is not None:
        ax.axvline(sat, color="k", ls="--", lw=1.0, label=f"lambda_{k} saturated ({sat:g})")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_linear_eigenvalues(results: dict[str, LinearResult], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False, sharey=True)
    for ax, (m, r) in zip(axes.flat, results.items()):
        _eigen_panel(ax, r.t, r.eigenvalues, LINEAR_LABELS[m], r.saturation_times()[-1])
    axes.flat[0].set_ylabel("eigenvalue of view 1's covariance")
    fig.suptitle("Linear regime: top eigenvalues of view 1's covariance against t")
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def plot_nonlinear(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False, sharey=True)
    for ax, r in zip(axes.flat, rows):
        _eigen_panel(ax, r["steps_logged"], r["top_eigenvalues"], r["method"], r["saturation_step"], "step")
    axes.flat[0].set_ylabel("eigenvalue of view 1's embedding covariance")
    fig.suptitle(f"Nonlinear regime (ResNet-18, engine): top-{len(rows[0]['top_eigenvalues'][0])} eigenvalues")
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def linear_table(results: dict[str, LinearResult]) -> str:
    d = len(next(iter(results.values())).eigenvalues[-1])
    lines = ["Saturation t (= lr x step) of each of the top eigenvalues of view 1's covariance: from there on "
             "within 10% of its final value; condition number lambda_1/lambda_d and entropy of the top d at the end.",
             "", f"| method | final loss | t_sat lambda_1 .. lambda_{d} | t_sat lambda_{d} | condition | entropy |",
             "|---|---:|---|---:|---:|---:|"]
    for r in (res.summary() for res in results.values()):
        sat = r["saturation_t"]
        lines.append(f"| {r['label']} | {_fmt(r['final_loss'], '.4g')} | {' / '.join(_fmt(s, 'g') for s in sat)} | "
                     f"{_fmt(sat[-1], 'g')} | {_fmt(r['condition_number'])} | {_fmt(r['entropy'], '.3f')} |")
    return "\n".join(lines) + "\n"


def nonlinear_table(rows: list[dict]) -> str:
    lines = ["Engine runs (synthetic preset, ResNet-18); k = the engine's `train.spectrum_topk`.", "",
             "| method | steps | final loss | saturation step of lambda_k | condition lambda_1/lambda_k | "
             "entropy top-k |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {_fmt(r['final_loss'], '.4g')} | "
                     f"{_fmt(r['saturation_step'], 'd')} | {_fmt(r['condition_topk'])} | "
                     f"{_fmt(r['entropy_topk'], '.3f')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------
QUICK = dict(hidden=32, dim=2, t_max=60.0)


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m toylab.dynamics", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- are Hydra overrides for every engine pretraining.")
    p.add_argument("--out", default="outputs/toylab/dynamics", help="output folder (default %(default)s)")
    p.add_argument("--data", default="data/synthetic/classification", help="ImageFolder root with train/ (and val/)")
    d = LinearConfig()
    p.add_argument("--n", type=int, default=d.n, help="images of the linear regime (default %(default)s)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden width of the linear network")
    p.add_argument("--dim", type=int, default=d.dim, help="embedding dimension d (top-d eigenvalues followed)")
    p.add_argument("--init-scale", type=float, default=d.init_scale, help="init scale of every weight")
    p.add_argument("--lr", type=float, default=d.lr, help="gradient-descent learning rate")
    p.add_argument("--t-max", type=float, default=d.t_max, help="effective time lr x steps to train for")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true",
                   help=f"the test's small linear setting ({', '.join(f'{k}={v}' for k, v in QUICK.items())})")
    p.add_argument("--steps", type=int, default=60, help="engine steps per method, nonlinear regime (default 60)")
    p.add_argument("--spectrum-every", type=int, default=5, help="engine steps between spectrum rows (default 5)")
    p.add_argument("--skip-nonlinear", action="store_true", help="only the linear regime")
    p.add_argument("--skip-linear", action="store_true", help="only the nonlinear regime")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "train").is_dir():
        p.error(f"{data} has no train/ folder; generate the embedded set with "
                "`python -m common.synthetic --out data/synthetic` (or `make data`), or pass --data")
    if min(args.n, args.hidden, args.dim, args.steps, args.spectrum_every) < 1 or args.lr <= 0 or args.t_max <= 0:
        p.error("need --n, --hidden, --dim, --steps, --spectrum-every >= 1 and --lr, --t-max > 0")
    given = {"n": args.n, "hidden": args.hidden, "dim": args.dim, "init_scale": args.init_scale, "lr": args.lr,
             "t_max": args.t_max, "seed": args.seed}
    if args.quick:  # the quick sizes, unless an option was given explicitly
        given.update({k: v for k, v in QUICK.items() if f"--{k.replace('_', '-')}" not in argv})
    cfg = LinearConfig(**{**asdict(LinearConfig()), **given})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ["# FroSSL's training dynamics (Section 5) on the embedded image set", ""]
    payload: dict = {}
    files = []
    if not args.skip_linear:
        lin = linear_regime(data, cfg)
        payload["linear"] = {"config": asdict(cfg), "results": {m: {**r.summary(), "t": r.t, "loss": r.loss,
                                                                    "eigenvalues": r.eigenvalues}
                                                                for m, r in lin.items()}}
        report += ["## Linear regime (Figure 2, Eq. 8)", "",
                   f"n = {cfg.n}, input 3 x {32 // cfg.pool} x {32 // cfg.pool}, hidden {cfg.hidden}, d = {cfg.dim}, "
                   f"init scale {cfg.init_scale:g}, lr {cfg.lr:g}, t_max {cfg.t_max:g}, seed {cfg.seed}.", "",
                   linear_table(lin)]
        files += [plot_linear_loss(lin, out / "linear_loss.png"),
                  plot_linear_eigenvalues(lin, out / "linear_eigenvalues.png")]
    if not args.skip_nonlinear:
        rows = []
        for i, m in enumerate(NONLINEAR_METHODS, 1):
            print(f"[dynamics nonlinear] {i}/{len(NONLINEAR_METHODS)} {m}", flush=True)
            rows.append(nonlinear_run(m, out, data.resolve(), args.steps, args.spectrum_every, extra))
        payload["nonlinear"] = {"steps": args.steps, "spectrum_every": args.spectrum_every, "overrides": extra,
                                "rows": rows}
        report += ["## Nonlinear regime (Figure 3)", "", nonlinear_table(rows)]
        files.append(plot_nonlinear(rows, out / "nonlinear_eigenvalues.png"))
    text = "\n".join(report)
    files += [write_json(out / "results.json", payload), atomic_write_text(out / "results.md", text)]
    print(text)
    print("wrote:\n" + "\n".join(f"  {f}" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
