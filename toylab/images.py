"""Toy lab, image half: the same sweep as ``toylab.blobs`` on the embedded image set.

Short pretrainings of the synthetic preset (ResNet-18, 32-px views, batch 64) by the real engine, one per
variant, then a k-NN evaluation of each backbone; reported per variant: the effective rank and lgIoC of the
projections' covariance spectrum at the end of training (the engine's spectrum metrics) and the k-NN
top-1 (``transfer.knn``, the stage `submit knn` runs). Variants:

- ``st_power`` over p (Sigma^-p by eigendecomposition; p = 0.5 is whitening),
- ``iternorm_only`` (IterNorm, no trace loss) and ``intl`` (IterNorm + trace loss) over T,
- a random-init row for the k-NN baseline.

One command; finished runs are reused (their folders say they are complete)::

    python -m toylab.images --out outputs/toylab/images

``--steps`` sets the length of every pretraining (default 150: about 1.5 min each on 2 cores), extra
Hydra overrides after ``--`` go to every pretraining (e.g. ``-- model.arch=resnet50``). Writes
``results.md``, ``results.json`` and ``results.png`` (k-NN top-1 and effective rank per variant).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_text, save_figure, write_json
from common.config import compose_config
from pretrain.train import run as pretrain_run
from toylab import split_overrides
from transfer.knn import run as knn_run

DEFAULT_POWERS = (0.25, 0.5, 0.75)
DEFAULT_ITERS = (1, 4)


@dataclass(frozen=True)
class Variant:
    name: str  # run folder name
    label: str  # table label
    overrides: tuple[str, ...]  # pretraining overrides; () with pretrain=False for the random-init row
    pretrain: bool = True


def variants(powers, iters) -> list[Variant]:
    out = [Variant(f"st_power_p{p:g}", f"st_power p={p:g}", ("method=st_power", f"method.power={p}")) for p in powers]
    for name in ("iternorm_only", "intl"):
        out += [Variant(f"{name}_T{t}", f"{name} T={t}", (f"method={name}", f"method.iters={t}")) for t in iters]
    return out + [Variant("random_init", "random init (no pretraining)", (), pretrain=False)]


def run_variant(v: Variant, out: Path, data_root: Path, steps: int, extra: list[str], knn_extra: list[str]) -> dict:
    row = {"variant": v.name, "label": v.label, "steps": 0, "effective_rank": None, "lg_ioc": None,
           "final_loss": None}
    if v.pretrain:
        cfg = compose_config("pretrain", ["pretrain/preset=synthetic", f"data.root={data_root}",
                                          f"run_dir={out / 'runs' / v.name}", f"train.max_steps={steps}", *v.overrides,
                                          *extra])
        summary = pretrain_run(cfg)
        row.update({k: summary[k] for k in ("steps", "effective_rank", "lg_ioc", "final_loss")})
        weights = [f"weights={summary['checkpoint']}"]
    else:  # the architecture the pretrainings use (the preset's, or the one in the extra overrides)
        arch = compose_config("pretrain", ["pretrain/preset=synthetic", *extra]).model.arch
        weights = ["weights=null", f"model.arch={arch}"]
    knn = knn_run(compose_config("knn", ["eval/knn=synthetic", f"data.root={data_root}", *weights,
                                         f"run_dir={out / 'knn' / v.name}", *knn_extra]))
    row.update(knn_top1=knn["top1"], knn_top5=knn["top5"], k=knn["k"])
    return row


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def results_table(rows: list[dict]) -> str:
    lines = ["| variant | steps | final loss | effective rank | lgIoC | k-NN top-1 (%) | k-NN top-5 (%) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['steps']} | {_fmt(r['final_loss'], '.4f')} | "
                     f"{_fmt(r['effective_rank'], '.1f')} | {_fmt(r['lg_ioc'], '.2f')} | {r['knn_top1']:.1f} | "
                     f"{r['knn_top5']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"].replace(" (no pretraining)", "") for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(labels, [r["knn_top1"] for r in rows], color="tab:blue")
    a.set_xlabel("k-NN top-1 (%)")
    a.invert_yaxis()
    b.barh(labels, [r["effective_rank"] or 0.0 for r in rows], color="tab:orange")
    b.set_xlabel("effective rank of the projections (end of training)")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.suptitle("Toy lab on the embedded image set: spectral transformations, IterNorm with/without trace loss")
    fig.tight_layout()
    return save_figure(fig, path)


def _numbers(text: str, cast) -> list:
    return [cast(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m toylab.images", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- are Hydra overrides for every pretraining.")
    p.add_argument("--out", default="outputs/toylab/images", help="output folder (default %(default)s)")
    p.add_argument("--data", default="data/synthetic/classification", help="ImageFolder root with train/ and val/")
    p.add_argument("--steps", type=int, default=150, help="pretraining steps per variant (default %(default)s)")
    p.add_argument("--powers", default=",".join(f"{x:g}" for x in DEFAULT_POWERS), help="powers p of st_power")
    p.add_argument("--iters", default=",".join(str(t) for t in DEFAULT_ITERS), help="IterNorm iteration counts T")
    p.add_argument("--knn", nargs="*", default=[], metavar="OVERRIDE", help="Hydra overrides for the k-NN runs")
    args = p.parse_args(argv)
    try:
        powers, iters = _numbers(args.powers, float), _numbers(args.iters, int)
    except ValueError:
        p.error(f"--powers/--iters must be comma-separated numbers, got {args.powers!r} / {args.iters!r}")
    if args.steps < 1 or any(t < 1 for t in iters) or any(x <= 0 for x in powers):
        p.error("need --steps >= 1, every T >= 1 and every power > 0")
    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        p.error(f"{data} has no train/ and val/ folders; generate the embedded set with "
                "`python -m common.synthetic --out data/synthetic` (or `make data`), or pass --data")
    out = Path(args.out)
    todo = variants(powers, iters)
    rows = []
    for i, v in enumerate(todo, 1):
        print(f"[toylab-images] {i}/{len(todo)} {v.label}", flush=True)
        rows.append(run_variant(v, out, data, args.steps, extra, args.knn))
    table = results_table(rows)
    files = [write_json(out / "results.json", {"steps": args.steps, "overrides": extra, "rows": rows}),
             atomic_write_text(out / "results.md", "# Toy lab on the embedded image set\n\n" + table),
             plot(rows, out / "results.png")]
    print(table)
    print("wrote:\n" + "\n".join(f"  {f}" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
