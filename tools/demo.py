"""`make demo`: the whole INTL chain on the embedded data, through the same commands a user types.

pretrain (2 local processes) -> intl-convert (both formats, --check) -> k-NN, linear, semi-supervised
(pretrained vs random init) -> Mask R-CNN R50-C4 fine-tuning (pretrained vs random init) -> report.

Every stage runs in its own run folder under outputs/<stage>/demo*; a stage whose folder is complete is
reused, so `make demo` again finishes in seconds and a demo stopped halfway (Ctrl-C) resumes where it
stopped. `--fresh` deletes the demo's run folders first. Writes outputs/demo/report.md,
outputs/demo/results.json and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo_report import write_report  # noqa: E402  (tools/, the script's folder)

from common.config import config_dir  # noqa: E402
from common.runlog import is_complete, read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INITS = ("pretrained", "random")
DETECTION_CONFIG = str(config_dir() / "detection" / "synthetic_R_50_C4.yaml")

# Two pretrainings of the same preset (INTL on the embedded set, 32-px views): a ResNet-18 for the
# classification stages and a ResNet-50 for detection (R50-C4 needs detectron2's bottleneck ResNet).
# Measured here: in the minutes a 2-core demo can spend, the ResNet-50 on 32-px views does not get ahead
# of random init on k-NN (150 steps: 10.0% vs 10.4%), while the ResNet-18 does (23.2% vs 10.8%); the
# report shows both backbones' k-NN so that nobody mistakes the detection weights for well-trained ones.
BACKBONES = {"resnet18": "demo", "resnet50": "demo-r50"}  # arch -> pretraining run name
PROFILES = {
    # `make demo`: about 16 minutes here with .venv built (README).
    "demo": {
        "data": [],
        "resnet18": ["train.spectrum_every=25", "train.eval_every=2"],  # the online probe's curve: 10 points
        "resnet50": ["pretrain/model=resnet50", "model.projector=[512,512,512]", "optim.epochs=10",
                     "train.spectrum_every=25"],
        "knn": [],
        "knn_resnet50": [],
        "linear": [],
        "linear_resnet50": [],
        "semi": [],
        # 2 seeds of the cheap stages (the report's spread per row); detection keeps 1 (2.6 min per seed here)
        "seeds": {"knn": 2, "knn_resnet50": 2, "linear": 2, "linear_resnet50": 2, "semi": 2},
        "detection": [],
    },
    # The end-to-end test of the demo (tests/e2e/test_demo.py): the same chain with every stage cut to a few steps.
    "tiny": {
        "data": ["--cls-size", "32", "--cls-train-per-class", "12", "--cls-val-per-class", "4", "--det-size", "96",
                 "--det-train-images", "8", "--det-val-images", "4"],
        "resnet18": ["model.projector=[64,64]", "optim.batch_size=16", "train.max_steps=3", "train.spectrum_every=0",
                     "train.log_every=1", "data.workers=0"],
        "resnet50": ["pretrain/model=resnet50", "model.projector=[64,64]", "optim.batch_size=16", "train.max_steps=2",
                     "train.spectrum_every=0", "train.log_every=1", "data.workers=0"],
        "knn": ["knn.batch_size=64", "data.workers=0"],
        "knn_resnet50": ["knn.batch_size=64", "data.workers=0"],
        "linear": ["optim.epochs=1", "optim.milestones=[1]", "train.max_steps_per_epoch=2", "data.workers=0"],
        "linear_resnet50": ["optim.epochs=1", "optim.milestones=[1]", "train.max_steps_per_epoch=2",
                            "data.workers=0"],
        "semi": ["optim.epochs=1", "train.max_steps_per_epoch=2", "data.workers=0"],
        "seeds": {"knn": 2},  # one stage with 2 seeds: the report's spread column is exercised
        "detection": ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1",
                      "TEST.PRECISE_BN.ENABLED", "False", "SOLVER.AMP.ENABLED", "False"],
    },
}


class StageFailed(RuntimeError):
    pass


def quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    """Runs one command with its output streamed to the terminal (indented) and kept in the stage log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {quote(cmd)}", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {quote(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            print("    " + line, end="", flush=True)
        if proc.wait() != 0:
            raise StageFailed(f"command failed with exit code {proc.returncode}: {quote(cmd)} (log: {log})")


def read_json(path: Path) -> dict:
    if not path.exists():
        raise StageFailed(f"expected {path} to exist after the stage ran")
    return json.loads(path.read_text())


class Demo:
    def __init__(self, workdir: Path, profile: str):
        self.workdir = workdir
        self.out = workdir / "outputs"
        self.demo_dir = self.out / "demo"
        self.data = workdir / "data" / "synthetic"
        self.settings = PROFILES[profile]
        self.results: dict = {}
        self.commands: dict[str, list[str]] = {}
        self.times: dict[str, float] = {}
        self.ran = self.any_ran = False
        previous = self.demo_dir / "results.json"
        self.previous_times = json.loads(previous.read_text()).get("wall_time_seconds", {}) if previous.exists() else {}

    def stage(self, key: str, title: str, fn) -> None:
        """Runs one stage; a stage whose runs were all reused keeps the wall time of the run that made them."""
        print(f"\n[demo] {title}", flush=True)
        t0, self.ran = time.time(), False
        fn()
        self.any_ran = self.any_ran or (self.ran and key != "data")
        spent = round(time.time() - t0, 1)
        self.times[key] = spent if self.ran else self.previous_times.get(key, spent)
        print(f"[demo] {title}: done in {spent:.0f} s" + ("" if self.ran else " (reused)"), flush=True)

    def shown(self, argv: list[str]) -> list[str]:
        """The command as a user types it in the checkout: the program's name, paths relative to the folder
        the demo runs in (else to the repository)."""
        out = [Path(argv[0]).name]
        for a in argv[1:]:
            for base in (self.workdir, ROOT):
                a = a.replace(f"{base}/", "")
            out.append(a)
        return out

    def cmd(self, key: str, argv: list[str], done: bool = False) -> None:
        """Runs a stage command, or reuses its run folder when that run is already complete (``done``)."""
        shown = self.shown(argv)
        self.commands.setdefault(key, []).append(quote(shown))
        if done:
            print(f"  reusing the complete run of: {quote(shown)}")
            return
        self.ran = True
        run(argv, self.workdir, self.demo_dir / "logs" / f"{key}.log")

    def submit(self, stage: str, name: str, gpus: int, overrides: list[str]) -> list[str]:
        return [str(BIN / "submit"), stage, "--cluster", "local", "--gpus", str(gpus), "--name", name, "--wait",
                *overrides]

    # --- stages -------------------------------------------------------------------------------
    def generate_data(self) -> None:
        self.cmd("data", [sys.executable, "-m", "common.synthetic", "--out", str(self.data), *self.settings["data"]])

    def pretrain(self) -> None:
        out = {}
        for arch, name in BACKBONES.items():
            run_dir = self.out / "pretrain" / name
            self.cmd("pretrain", self.submit("pretrain", name, 2, [
                "pretrain/preset=synthetic", *self.settings[arch], f"data.root={self.data / 'classification'}"]),
                done=is_complete(run_dir))
            out[arch] = pretrain_summary(run_dir)
        self.results["pretrain"] = out

    def weights(self, arch: str, suffix: str) -> Path:
        return self.demo_dir / f"intl_{arch}{suffix}"

    def convert(self) -> None:
        for arch, name in BACKBONES.items():
            ckpt = self.out / "pretrain" / name / "last.pth"
            for suffix in (".pth", ".pkl"):
                target = self.weights(arch, suffix)
                fresh = target.exists() and target.stat().st_mtime >= ckpt.stat().st_mtime
                # --force: a stale target is this demo's own earlier conversion (intl-convert refuses to replace a
                # file without it, and a training checkpoint even with it)
                self.cmd("convert", [str(BIN / "intl-convert"), str(ckpt), str(target), "--check", "--force"],
                         done=fresh)

    def classification(self, stage: str, arch: str = "resnet18", key: str | None = None) -> None:
        """Pretrained and random init, one run per seed (``seed=k``: the random init, the data order and, for
        semi-supervised, the subset); results[key][init] = {"seed<k>": results.json}."""
        out = {}
        for init in INITS:
            weights = [f"weights={self.weights(arch, '.pth')}"] if init == "pretrained" else \
                ["weights=null", f"model.arch={arch}"]
            out[init] = {}
            for seed in range(self.seeds(key or stage)):
                name = (f"demo-{init}" if arch == "resnet18" else f"demo-{arch}-{init}") + f"-seed{seed}"
                run_dir = self.out / stage / name
                self.cmd(key or stage, self.submit(stage, name, 2, [
                    f"eval/{stage}=synthetic", *self.settings[key or stage], *weights, f"seed={seed}",
                    f"data.root={self.data / 'classification'}"]), done=is_complete(run_dir))
                out[init][f"seed{seed}"] = read_json(run_dir / "results.json")
        self.results[key or stage] = out

    def seeds(self, key: str) -> int:
        return int(self.settings.get("seeds", {}).get(key, 1))

    def detection(self) -> None:
        out = {}
        n = self.seeds("detection")
        for init in INITS:
            name = f"demo-{init}"
            run_dir = self.out / "detection" / name
            weights = str(self.weights("resnet50", ".pkl")) if init == "pretrained" else ""
            done = all(is_complete(run_dir / f"seed{k}") for k in range(n)) and (run_dir / "results.json").exists()
            self.cmd("detection", [*self.submit("detection", name, 1, []), "--seeds", str(n),
                                   "--config-file", DETECTION_CONFIG, "MODEL.WEIGHTS", weights,
                                   *self.settings["detection"]], done=done)
            out[init] = read_json(run_dir / "results.json")
        self.results["detection"] = out


def pretrain_summary(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    losses = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    spectra = [r for r in rows if isinstance(r.get("effective_rank"), (int, float))]
    summary = {"run_dir": str(run_dir), "steps": losses[-1]["step"] if losses else 0,
               "loss_first": losses[0]["loss"] if losses else None,
               "loss_last": losses[-1]["loss"] if losses else None}
    if spectra:
        summary.update(eff_rank_first=spectra[0]["effective_rank"], eff_rank_last=spectra[-1]["effective_rank"])
    for key in ("probe_val_top1", "knn_top1"):  # the monitor's last figures (pretrain/monitor.py)
        last = next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)
        if last is not None:
            summary[f"{key}_last"] = last
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh", action="store_true", help="delete the demo's run folders and start from scratch")
    p.add_argument("--workdir", type=Path, default=ROOT,
                   help="folder holding data/ and outputs/ (default: the repository); commands run from it")
    p.add_argument("--profile", choices=sorted(PROFILES), default="demo",
                   help="demo: the real demo; tiny: every stage cut to a few steps (the end-to-end test)")
    args = p.parse_args(argv)
    demo = Demo(args.workdir.resolve(), args.profile)
    if args.fresh:
        for d in [demo.demo_dir, *demo.out.glob("*/demo"), *demo.out.glob("*/demo-*")]:
            print(f"[demo] --fresh: removing {d}")
            shutil.rmtree(d, ignore_errors=True)
    demo.demo_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        demo.stage("data", "0/6 the embedded datasets", demo.generate_data)
        demo.stage("pretrain", "1/6 pretraining INTL on the embedded set (ResNet-18, then ResNet-50), "
                   "2 local processes", demo.pretrain)
        demo.stage("convert", "2/6 converting the checkpoint to torchvision and detectron2 weights", demo.convert)
        demo.stage("knn", "3/6 k-NN evaluation, pretrained and random init", lambda: demo.classification("knn"))
        demo.stage("knn_resnet50", "3/6 k-NN evaluation of the ResNet-50 (the detection weights)",
                   lambda: demo.classification("knn", "resnet50", "knn_resnet50"))
        demo.stage("linear", "4/6 linear evaluation, pretrained and random init", lambda: demo.classification("linear"))
        demo.stage("linear_resnet50", "4/6 linear evaluation of the ResNet-50",
                   lambda: demo.classification("linear", "resnet50", "linear_resnet50"))
        demo.stage("semi", "5/6 semi-supervised fine-tuning on a 10% subset, pretrained and random init",
                   lambda: demo.classification("semi"))
        demo.stage("detection", "6/6 Mask R-CNN R50-C4 fine-tuning, pretrained and random init", demo.detection)
    except StageFailed as e:
        print(f"\n[demo] FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[demo] interrupted; `make demo` again resumes where it stopped (`make demo DEMO_ARGS=--fresh` "
              "starts over)", file=sys.stderr)
        return 130
    total = time.time() - t0 if demo.any_ran else demo.previous_times.get("total", time.time() - t0)
    write_report(demo.demo_dir, demo.results, demo.commands, demo.times, total_seconds=total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
