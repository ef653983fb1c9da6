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
    for stage in ("knn", "linear", "semi", "detection"):
        assert set(results[stage]) == {"pretrained", "random"}, stage
    for init in ("pretrained", "random"):
        assert 0 <= results["knn"][init]["top1"] <= 100 and 0 <= results["linear"][init]["top5"] <= 100
        assert 0 <= results["semi"][init]["top1"] <= 100
        assert set(results["detection"][init]["mean"]) == {"bbox", "segm"}
        assert results["detection"][init]["mean"]["segm"]["AP"] is not None
    assert set(results["pretrain"]) == {"resnet18", "resnet50"}
    assert results["pretrain"]["resnet18"]["steps"] == 3 and results["pretrain"]["resnet50"]["steps"] == 2
    assert results["linear"]["pretrained"]["source_checkpoint"].endswith("intl_resnet18.pth")
    numbers = list(_numbers({k: results[k] for k in STAGE_KEYS}))
    assert len(numbers) > 40 and all(math.isfinite(x) for x in numbers)
    report = (out / "demo" / "report.md").read_text()
    assert "| k-NN top-1 (k=5) | ResNet-18 |" in report and "| Mask R-CNN C4 segm AP | ResNet-50 |" in report
    assert "submit detection --cluster local" in report and "## Wall time per stage" in report
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
