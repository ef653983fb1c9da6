"""`make demo` end to end (issue 7), in its tiny profile: the same chain of `submit` / `intl-convert`
commands as the real demo, every stage cut to a few steps, on the tiny copy of the embedded sets."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE_KEYS = ("pretrain", "knn", "linear", "semi", "detection")


def _demo(workdir: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "demo.py"), "--workdir", str(workdir),
                             "--profile", "tiny", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the demo ended (exit {proc.returncode}) before {path} appeared"
        assert time.time() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.5)


def test_demo_chain_writes_the_report_resumes_after_ctrl_c_and_reuses_finished_stages(tmp_path):
    work = tmp_path / "work"  # the tiny profile generates its own small copy of the embedded sets here
    out = work / "outputs"

    # Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once the k-NN stage has started.
    proc = _demo(work, start_new_session=True)
    _wait_for(out / "demo" / "logs" / "knn.log", proc, timeout=600)
    os.killpg(proc.pid, signal.SIGINT)
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, first[-3000:]
    assert "interrupted; `make demo` again resumes where it stopped" in first
    assert not (out / "demo" / "report.md").exists()

    # Started again: the finished pretraining runs and conversions are reused, the rest runs, the report is written.
    proc = _demo(work)
    second = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, second[-5000:]
    assert second.count("reusing the complete run of: submit pretrain") == 2
    assert second.count("reusing the complete run of: intl-convert") == 4
    results = json.loads((out / "demo" / "results.json").read_text())
    assert set(STAGE_KEYS) <= set(results)
    for stage in ("knn", "linear", "semi", "detection", "knn_resnet50", "linear_resnet50"):
        assert set(results[stage]) == {"pretrained", "random"}, stage
    for init in ("pretrained", "random"):
        # the tiny profile runs k-NN with 2 seeds (seed=k: the random init), the other stages with one
        assert set(results["knn"][init]) == {"seed0", "seed1"} and set(results["linear"][init]) == {"seed0"}
        for seed in ("seed0", "seed1"):
            assert 0 <= results["knn"][init][seed]["top1"] <= 100 and results["knn"][init][seed]["config"]["seed"] == \
                int(seed[-1])
        assert 0 <= results["linear"][init]["seed0"]["top5"] <= 100
        assert 0 <= results["semi"][init]["seed0"]["top1"] <= 100
        assert 0 <= results["linear_resnet50"][init]["seed0"]["top1"] <= 100
        assert set(results["detection"][init]["mean"]) == {"bbox", "segm"}
        assert results["detection"][init]["mean"]["segm"]["AP"] is not None
    # two random inits differ (seeded), the pretrained k-NN is one set of weights
    assert results["knn"]["pretrained"]["seed0"]["top1"] == results["knn"]["pretrained"]["seed1"]["top1"]
    assert set(results["pretrain"]) == {"resnet18", "resnet50"}
    assert results["pretrain"]["resnet18"]["steps"] == 3 and results["pretrain"]["resnet50"]["steps"] == 2
    assert results["linear"]["pretrained"]["seed0"]["source_checkpoint"].endswith("intl_resnet18.pth")
    # per row: pretrained minus random, paired by seed, with its spread where there are 2 seeds
    rows = {(r["metric"], r["backbone"]): r for r in results["comparison"]}
    knn = rows[("k-NN top-1 (k=5)", "ResNet-18")]
    pre, rnd = ([results["knn"][i][s]["top1"] for s in ("seed0", "seed1")] for i in ("pretrained", "random"))
    assert knn["n_seeds"] == 2 and math.isclose(knn["difference"], sum(pre) / 2 - sum(rnd) / 2, abs_tol=1e-9)
    assert math.isclose(knn["spread"], abs((pre[0] - rnd[0]) - (pre[1] - rnd[1])) / math.sqrt(2), abs_tol=1e-9)
    assert knn["beats_random"] == (knn["difference"] > knn["spread"])
    assert rows[("linear top-1", "ResNet-50")]["n_seeds"] == 1 and rows[("linear top-1", "ResNet-50")]["spread"] is None
    assert {("Mask R-CNN C4 bbox AP50", "ResNet-50"), ("Mask R-CNN C4 segm AP50", "ResNet-50")} <= set(rows)
    numbers = list(_numbers({k: results[k] for k in STAGE_KEYS}))
    assert len(numbers) > 40 and all(math.isfinite(x) for x in numbers)
    report = (out / "demo" / "report.md").read_text()
    assert "| k-NN top-1 (k=5) | ResNet-18 |" in report and "| Mask R-CNN C4 segm AP | ResNet-50 |" in report
    assert "submit detection --cluster local" in report and "## Wall time per stage" in report
    assert "| metric | backbone | INTL pretrained | random init | pretrained − random (± spread) |" in report
    assert "Pretrained minus random init is larger than its spread over seeds on" in report
    assert "Detection loss over the second half of training" in report
    # the commands are the ones a user types in the checkout: no absolute path of this machine
    commands = report.split("## Commands", 1)[1]
    assert str(work) not in commands and str(ROOT) not in commands
    assert "data.root=data/synthetic/classification" in commands
    assert "configs/detection/synthetic_R_50_C4.yaml" in commands
    assert "online probe val top-1" in report and "![pretrain_monitor.png](pretrain_monitor.png)" in report
    for png in ("pretrain_loss.png", "pretrain_monitor.png", "detection_loss.png"):
        assert (out / "demo" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Once more: every stage is reused, nothing is submitted, and the same numbers come back.
    proc = _demo(work)
    third = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, third[-3000:]
    assert "$ " not in third.replace("$ " + sys.executable, "")  # no stage command ran (data check only)
    assert json.loads((out / "demo" / "results.json").read_text())["knn"] == results["knn"]
    assert json.loads((out / "demo" / "results.json").read_text())["wall_time_seconds"]["pretrain"] == \
        results["wall_time_seconds"]["pretrain"]
