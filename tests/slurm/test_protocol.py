"""`submit protocol` without Slurm: the job graph, its dependency parameters, resubmission (reuse, wait, re-run,
refuse), --dry-run, the evaluation settings per dataset, the paper's reference, --status and the report, on the
tiny embedded sets. Jobs are not run here (tests/e2e/test_protocol_e2e.py runs them)."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest

from common.atomic import write_json
from common.config import compose_config
from common.provenance import record_attempt
from common.runlog import mark_complete, write_results
from slurm import protocol as P
from slurm import protocol_report as R
from slurm.errors import SubmitError
from slurm.executor import SLURM, Resources, render_sbatch, slurm_parameters
from slurm.runs import ActiveJob, read_submissions, record_submission
from stage_fixtures import tiny_protocol_args


def _args(*argv: str):
    return P.build_parser().parse_intermixed_args(list(argv))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------ pieces
def test_overrides_go_to_the_pretraining_or_to_the_evaluations_they_name(capsys):
    pre, per = P.split_overrides(["optim.epochs=2", "linear:optim.epochs=1", "semi:optim.epochs=3",
                                  "eval:data.workers=0", "detection:SOLVER.MAX_ITER=5", "data.root=/a:b"], P.EVALS)
    assert pre == ["optim.epochs=2", "data.root=/a:b"]
    assert per["linear"] == ["optim.epochs=1", "data.workers=0"]
    assert per["semi1"] == per["semi10"] == ["optim.epochs=3", "data.workers=0"]
    assert per["knn"] == ["data.workers=0"] and per["detection"] == ["SOLVER.MAX_ITER", "5"]
    for bad, message in (("lin:optim.epochs=1", "'lin' is not an evaluation"),
                         ("linear:weights=x.pth", "weights is set by the protocol"),
                         ("detection:MODEL.WEIGHTS=x.pkl", "MODEL.WEIGHTS is set by the protocol")):
        with pytest.raises(SubmitError, match=message):
            P.split_overrides([bad], P.EVALS)
    assert P.split_overrides(["knn:knn.k=3", "eval:data.workers=0"], ["linear"]) == \
        ([], {"linear": ["data.workers=0"]})
    assert "--evals linear leaves out knn: their overrides are not used" in capsys.readouterr().out


def test_dependency_and_cpu_only_jobs_in_the_sbatch_parameters(tmp_path):
    params = slurm_parameters(Resources(cluster=SLURM, gpus=0, dependency="afterok:5:6"))
    assert "gpus_per_node" not in params and params["ntasks_per_node"] == 1
    assert params["dependency"] == "afterok:5:6" and params["additional_parameters"]["kill_on_invalid_dep"] == "yes"
    script = render_sbatch(Resources(cluster=SLURM, gpus=2, dependency="afterany:7"), tmp_path)
    assert "#SBATCH --dependency=afterany:7" in script and "#SBATCH --kill-on-invalid-dep=yes" in script
    assert "#SBATCH --gpus-per-node=2" in script
    assert "dependency" not in slurm_parameters(Resources(cluster=SLURM, gpus=1))


@pytest.mark.parametrize("preset, linear, semi1", [
    ("imagenet_800ep", "eval/linear=imagenet", "eval/semi=imagenet_1pct"),
    ("imagenet_800ep_multicrop_ema", "eval/linear=imagenet_multicrop", "eval/semi=imagenet_1pct_ema"),
    ("synthetic", "eval/linear=synthetic", "eval/semi=synthetic"),
])
def test_the_evaluations_follow_the_pretraining_dataset_and_encoder(preset, linear, semi1):
    cfg = P._container("pretrain", [f"pretrain/preset={preset}"])
    name, setting = P._select_setting(cfg)
    assert setting["linear"] == [linear] and setting["semi1"][0] == semi1
    assert setting["detection"]["config_file"] == ("detection/synthetic_R_50_C4.yaml" if name == "synthetic" else
                                                   "detection/coco_R_50_C4_1x.yaml")


def test_a_dataset_without_evaluation_settings_is_refused():
    with pytest.raises(SubmitError, match="no evaluation settings for a pretraining on views 'cifar'"):
        P._select_setting(P._container("pretrain", ["pretrain/preset=cifar10"]))


def test_snapshots_set_keep_every_epochs_or_say_why_they_cannot():
    cfg = P._container("pretrain", ["pretrain/preset=imagenet_800ep"])
    assert P._snapshot_overrides(cfg, [100, 200, 400]) == ["train.keep_every_epochs=100"]
    assert P._snapshot_overrides(cfg, [300, 450]) == ["train.keep_every_epochs=150"]
    with pytest.raises(SubmitError, match=r"--snapshots \[800\] must be before the last epoch"):
        P._snapshot_overrides(cfg, [400, 800])
    with pytest.raises(SubmitError, match="train.keep_snapshots=2 deletes the older ones"):
        P._snapshot_overrides(P._container("pretrain", ["pretrain/preset=imagenet_800ep", "train.keep_snapshots=2"]),
                              [100])
    with pytest.raises(SubmitError, match=r"train.keep_every_epochs=300 keeps no snapshot at epoch\(s\) \[100\]"):
        P._snapshot_overrides(P._container("pretrain", ["pretrain/preset=imagenet_800ep",
                                                        "train.keep_every_epochs=300"]), [100])


def test_the_reference_applies_to_the_preset_only_and_not_to_changed_evaluations():
    neutral = ["pretrain/preset=imagenet_800ep", "data.root=/datasets/imagenet", "train.log_every=10",
               "train.keep_every_epochs=100", "data.workers=10"]
    ref = P._reference("imagenet_800ep", P._container("pretrain", neutral),
                       {"linear": ["optim.epochs=90"], "semi1": ["subset.list=/lists/1percent.txt"], "knn": []})
    assert ref["why_not"] is None and ref["own_eval_settings"] == {"linear": ["optim.epochs"]}
    ref = P._reference("imagenet_800ep", P._container("pretrain", [*neutral, "optim.batch_size=256"]), {})
    assert "differs from the preset 'imagenet_800ep'" in ref["why_not"] and "optim.batch_size: 512 -> 256" in \
        ref["why_not"]
    assert "names no preset" in P._reference(None, P._container("pretrain", []), {})["why_not"]


# ------------------------------------------------------------------------------------------ the graph
def test_the_graph_its_dependencies_and_every_job_with_its_own_resources(tiny_synthetic, workdir):
    args = _args("--cluster", "slurm", "--gpus", "2", "--eval-gpus", "1", "--detection-gpus", "2",
                 "--detection-seeds", "2", "--snapshots", "1", "--snapshot-evals", "knn,detection",
                 *tiny_protocol_args(tiny_synthetic))
    proto = P.plan(args)
    nodes = {n.key: n for n in proto.nodes}
    assert list(nodes) == ["pretrain", "knn/epoch_1", "convert/epoch_1", "detection/epoch_1/seed0",
                           "detection/epoch_1/seed1", "linear/last", "knn/last", "semi1/last", "semi10/last",
                           "convert/last", "detection/last/seed0", "detection/last/seed1", "report"]
    folder = workdir / "outputs" / "protocol" / "intl_synthetic"
    assert proto.folder == folder and all(n.run_dir == folder / n.key for n in proto.nodes)
    for key, node in nodes.items():
        want = {"pretrain": (), "report": tuple(k for k in nodes if k != "report")}.get(
            key, (f"convert/{key.split('/')[1]}",) if key.startswith("detection") else ("pretrain",))
        assert node.deps == want, key
        assert node.after == ("afterany" if key == "report" else "afterok")
    gpus = {k: (n.res.nodes, n.res.gpus) for k, n in nodes.items()}
    assert gpus["pretrain"] == (1, 2) and gpus["linear/last"] == gpus["knn/epoch_1"] == (1, 1)
    assert gpus["detection/last/seed1"] == (1, 2) and gpus["convert/last"] == gpus["report"] == (1, 0)
    pre = nodes["pretrain"].job.config
    assert pre["train"]["keep_every_epochs"] == 1 and pre["run_dir"] == str(folder / "pretrain")
    assert pre["model"]["arch"] == "resnet50"
    semi1, semi10, lin = (nodes[k].job.config for k in ("semi1/last", "semi10/last", "linear/last"))
    assert semi1["subset"]["percent"] == 1 and semi10["subset"]["percent"] == 10 and lin["optim"]["epochs"] == 1
    assert lin["data"]["root"] == str(tiny_synthetic / "classification") and lin["data"]["workers"] == 0
    assert nodes["knn/epoch_1"].job.config["weights"] == str(folder / "pretrain" / "epoch_1.pth")
    assert lin["weights"] == str(folder / "pretrain" / "last.pth")
    det = nodes["detection/last/seed1"].job
    opts = dict(zip(det.opts[0::2], det.opts[1::2]))
    assert opts["MODEL.WEIGHTS"] == str(folder / "convert" / "last" / "backbone.pkl") and opts["SEED"] == "1"
    assert opts["SOLVER.MAX_ITER"] == "2" and det.output_dir == str(folder / "detection" / "last" / "seed1")
    assert nodes["convert/epoch_1"].job.source == str(folder / "pretrain" / "epoch_1.pth")
    assert not (workdir / "outputs").exists()  # planning writes nothing

    local = P.plan(_args("--cluster", "local", "--evals", "knn", *tiny_protocol_args(tiny_synthetic)))
    assert "report" not in [n.key for n in local.nodes]  # the local driver writes the report itself


def test_bad_protocols_are_refused_before_anything_is_queued(tiny_synthetic, workdir, capsys):
    data = f"data.root={tiny_synthetic / 'classification'}"
    cases = [
        (["--evals", "linear,detection", "pretrain/preset=synthetic", data], "needs a ResNet-50 backbone"),
        (["--evals", "linear,segmentation", data], "unknown segmentation"),
        (["--snapshots", "2", *tiny_protocol_args(tiny_synthetic)], r"--snapshots \[2\] must be before the last"),
        (["--eval-gpus", "3", "--detection-gpus", "1", *tiny_protocol_args(tiny_synthetic)],
         "the linear stage rejects this setup: optim.batch_size=64 .* not a positive multiple of the 3 processes"),
        (["linear:optim.epochz=1", *tiny_protocol_args(tiny_synthetic)], "epochz"),
    ]
    for argv, message in cases:
        assert P.main(["--cluster", "local", "--dry-run", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "submit protocol: error:" in err and re.search(message, err), (argv, err)
    assert not (workdir / "outputs").exists()


def test_dry_run_prints_the_graph_and_every_sbatch_script(tiny_synthetic, workdir, capsys):
    assert P.main(["--cluster", "slurm", "--dry-run", "--gpus", "2", "--evals", "linear,detection",
                   *tiny_protocol_args(tiny_synthetic)]) == 0
    out = capsys.readouterr().out
    assert "pretrain                     new" in out and "detection/last/seed0" in out
    assert out.count("#!/bin/bash") == 5  # pretrain, linear, convert, one detection seed, report
    assert out.count("#SBATCH --dependency=afterok:@pretrain\n") == 2  # linear and convert
    assert "#SBATCH --dependency=afterok:@convert/last\n" in out
    assert "#SBATCH --dependency=afterany:@pretrain:@linear/last:@convert/last:@detection/last/seed0\n" in out
    assert out.count("#SBATCH --kill-on-invalid-dep=yes") == 4 and "#SBATCH --gpus-per-node=2" in out
    assert "nothing was submitted and nothing was written" in out and not (workdir / "outputs").exists()


# ------------------------------------------------------------------------------------------ submitting
@pytest.fixture
def fake_slurm(monkeypatch):
    """`_queue` records the dependency each job was given and writes its submissions.jsonl line (job ids from
    101 on); `active` holds the jobs the fake squeue still lists."""
    queued, active, ids = [], {}, itertools.count(101)

    class Job:
        def __init__(self):
            self.job_id = str(next(ids))

    def fake_queue(plan, res, run_dir, argv):
        job = Job()
        queued.append((str(run_dir), res.dependency))
        record_submission(run_dir, {"stage": plan.spec.name, "cluster": SLURM, "job_ids": [job.job_id], "nodes": 1,
                                    "gpus": res.gpus})
        return run_dir / "submitit", [job]

    def fake_active(run_dir):
        run_dir = Path(run_dir)
        return [ActiveJob(active[run_dir], "PENDING", {"cluster": SLURM})] if run_dir in active else []

    monkeypatch.setattr(P, "_queue", fake_queue)
    monkeypatch.setattr(P, "_check_cluster", lambda res, dry_run: False)
    monkeypatch.setattr(P, "active_jobs", fake_active)
    monkeypatch.setattr(R, "active_jobs", fake_active)
    return queued, active


def _complete(run_dir: Path, results: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record_attempt(run_dir, world_size=1)
    if results is not None:
        write_results(run_dir, results)
    mark_complete(run_dir, results)


def test_slurm_jobs_wait_for_what_they_need_and_a_resubmission_reuses_waits_and_reruns(
        tiny_synthetic, workdir, fake_slurm, capsys):
    queued, active = fake_slurm
    argv = ["--cluster", "slurm", "--evals", "linear,knn,detection", *tiny_protocol_args(tiny_synthetic)]
    assert P.main(argv) == 0
    folder = workdir / "outputs" / "protocol" / "intl_synthetic"
    ids = {str(Path(r).relative_to(folder)): str(101 + i) for i, (r, _) in enumerate(queued)}
    deps = {str(Path(r).relative_to(folder)): d for r, d in queued}
    assert list(deps) == ["pretrain", "linear/last", "knn/last", "convert/last", "detection/last/seed0", "report"]
    assert deps["pretrain"] is None
    assert deps["linear/last"] == deps["knn/last"] == deps["convert/last"] == f"afterok:{ids['pretrain']}"
    assert deps["detection/last/seed0"] == f"afterok:{ids['convert/last']}"
    assert deps["report"] == "afterany:" + ":".join(ids[k] for k in list(ids)[:-1])
    out = capsys.readouterr().out
    assert f"pretrain                     job {ids['pretrain']}" in out and "6 job(s) submitted" in out
    assert json.loads((folder / "protocol.json").read_text())["evals"] == ["linear", "knn", "detection"]

    # The pretraining and linear finished; knn is still queued; the conversion failed (so its seed never ran).
    _complete(folder / "pretrain")
    _complete(folder / "linear" / "last", {"top1": 12.0, "top5": 50.0})
    active[folder / "knn" / "last"] = ids["knn/last"]
    queued.clear()
    assert P.main(argv) == 0
    again = {str(Path(r).relative_to(folder)): d for r, d in queued}
    assert list(again) == ["convert/last", "detection/last/seed0", "report"]  # nothing submitted twice
    assert again["convert/last"] is None  # the pretraining is complete: nothing to wait for
    assert again["detection/last/seed0"] == "afterok:107"  # the new conversion job
    assert again["report"] == f"afterany:{ids['knn/last']}:107:108"
    out = capsys.readouterr().out
    assert "already queued or running, not submitted again: knn/last" in out
    assert "3 job(s) submitted, 1 waited for, 2 complete and reused" in out
    assert len(read_submissions(folder / "knn" / "last")) == 1
    assert len(read_submissions(folder / "convert" / "last")) == 2

    # A complete job is reused only with its settings (workers are not a setting).
    queued.clear()
    assert P.main([*argv, "linear:optim.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "linear/last is complete" in err and "optim.epochs: 1 -> 2" in err and "--name <new name>" in err
    assert queued == []
    assert P.main([*argv, "linear:data.workers=1"]) == 0


def test_a_running_local_driver_blocks_a_slurm_submission(tiny_synthetic, workdir, monkeypatch, capsys):
    queued = []
    monkeypatch.setattr(P, "_queue", lambda *a: queued.append(a))
    monkeypatch.setattr(P, "_check_cluster", lambda res, dry_run: False)
    folder = workdir / "outputs" / "protocol" / "intl_synthetic"
    driver = subprocess.Popen(["sleep", "120"])  # stands for another process running the graph
    try:
        # what `submit protocol --cluster local` records while it runs the graph: its own (live) pid
        record_submission(folder, {"cluster": "local", "host": socket.gethostname(), "job_ids": [driver.pid]})
        assert P.main(["--cluster", "slurm", "--evals", "knn", *tiny_protocol_args(tiny_synthetic)]) == 2
        assert f"is being run by `submit protocol --cluster local` (pid {driver.pid}" in capsys.readouterr().err
        assert queued == []
    finally:
        driver.kill()
        driver.wait()
    # a driver that ended (or this very process, once its driver returned) does not block
    record_submission(folder, {"cluster": "local", "host": socket.gethostname(), "job_ids": [os.getpid()]})
    assert R.local_driver(folder) is None


# ------------------------------------------------------------------------------------------ status and report
def _fake_protocol(folder: Path, preset: str | None, evals: list[str], seeds: int = 2) -> dict:
    nodes = [{"key": "pretrain", "stage": "pretrain", "run_dir": str(folder / "pretrain"), "deps": [], "config": {}}]
    for ev in evals:
        if ev == "detection":
            nodes.append({"key": "convert/last", "stage": "convert", "run_dir": str(folder / "convert" / "last"),
                          "deps": ["pretrain"], "config": {}})
            nodes += [{"key": f"detection/last/seed{k}", "stage": "detection", "deps": ["convert/last"], "config": {},
                       "run_dir": str(folder / "detection" / "last" / f"seed{k}")} for k in range(seeds)]
        else:
            nodes.append({"key": f"{ev}/last", "stage": ev.rstrip("10"), "run_dir": str(folder / ev / "last"),
                          "deps": ["pretrain"], "config": {}})
    protocol = {"name": folder.name, "command": "submit protocol ...", "evals": evals, "snapshots": [],
                "checkpoints": ["last"], "reference": {"preset": preset, "why_not": None, "own_eval_settings": {}},
                "nodes": nodes}
    write_json(folder / "protocol.json", protocol)
    return protocol


def _failed(run_dir: Path, job_id: str, error: str | None) -> None:
    record_submission(run_dir, {"cluster": SLURM, "job_ids": [job_id], "nodes": 1, "gpus": 1})
    if error is not None:
        (run_dir / "submitit").mkdir(parents=True, exist_ok=True)
        (run_dir / "submitit" / f"{job_id}_0_log.err").write_text(f"Traceback (most recent call last):\n"
                                                                    f"  ...\n{error}\n")


def test_status_and_report_show_failed_jobs_with_their_logs_and_the_others_numbers(tmp_path, fake_slurm, capsys):
    folder = tmp_path / "outputs" / "protocol" / "p"
    _fake_protocol(folder, "imagenet_800ep", ["linear", "knn", "semi1", "detection"])
    _complete(folder / "pretrain")
    (folder / "pretrain" / "COMPLETE").write_text(json.dumps({"steps": 14, "epochs": 2.0}))
    record_submission(folder / "pretrain", {"cluster": SLURM, "job_ids": ["11"], "nodes": 1, "gpus": 2})
    _complete(folder / "linear" / "last", {"top1": 61.25, "top5": 88.5})
    _complete(folder / "knn" / "last", {"top1": 40.0, "top5": 70.0, "k": 5})
    _failed(folder / "semi1" / "last", "14", "transfer.subsets.SubsetError: 3 of the 10 files of the subset list "
                                             "are not in the dataset")
    _failed(folder / "convert" / "last", "15", None)  # never started: no log
    assert P.print_status(folder) == 1
    out = capsys.readouterr().out
    assert "7 jobs: 3 done, 2 failed, 2 not run" in out
    semi = next(line for line in out.splitlines() if line.strip().startswith("semi1/last"))
    assert "failed" in semi and "slurm job 14" in semi and "SubsetError: 3 of the 10 files" in semi
    assert f"logs: {folder}/semi1/last/submitit/14_0_log.out | {folder}/semi1/last/submitit/14_0_log.err" in out
    assert "ended without a log: it never started" in out
    seed = next(line for line in out.splitlines() if line.strip().startswith("detection/last/seed0"))
    assert "not run" in seed and "convert/last failed" in seed

    summary = R.write_report(folder)
    rows = {r["row"]: r for r in summary["classification"]}
    assert rows["linear top-1"]["cells"]["last"] == {"state": "done", "value": 61.25}
    assert rows["linear top-1"]["reference"] == 73.1 and rows["linear top-5"]["reference"] is None
    assert rows["5-NN top-1"]["cells"]["last"]["value"] == 40.0
    cell = rows["semi-supervised 1% top-1"]["cells"]["last"]
    assert cell["state"] == "failed" and cell["log"].endswith("semi1/last/submitit/14_0_log.err")
    assert summary["failed"] == ["semi1/last", "convert/last"] and not summary["complete"]
    md = (folder / "results.md").read_text()
    assert "| linear top-1 | 61.2 | 73.1 |" in md and "| semi-supervised 1% top-1 | FAILED (semi1/last) |  |" in md
    assert "| final (epoch 2) | paper (INTL) |" in md and "winci-ai/INTL" in md
    assert "| semi1/last | failed: transfer.subsets.SubsetError" in md and "14_0_log.err |" in md
    job = next(j for j in summary["jobs"] if j["key"] == "linear/last")
    assert job["attempts"] == 1 and job["commit"] and job["wall_time_s"] is not None


def test_detection_seeds_are_aggregated_to_mean_and_std_beside_the_papers(tmp_path, fake_slurm):
    folder = tmp_path / "p"
    _fake_protocol(folder, "imagenet_200ep", ["detection"])
    for path in ("pretrain", "convert/last"):
        _complete(folder / path)
    for seed, ap in ((0, 40.0), (1, 42.0)):
        res = {t: {"AP50": 60.0 + seed, "AP": ap, "AP75": 44.0} for t in ("bbox", "segm")}
        _complete(folder / "detection" / "last" / f"seed{seed}", res)
    summary = R.write_report(folder)
    rows = {r["row"]: r for r in summary["detection"]}
    assert list(rows) == ["bbox AP50", "bbox AP", "bbox AP75", "segm AP50", "segm AP", "segm AP75"]
    assert rows["bbox AP"]["cells"]["last"]["value"] == 41.0
    assert rows["bbox AP"]["cells"]["last"]["std"] == pytest.approx(2 ** 0.5)
    assert rows["bbox AP50"]["reference"] == {"mean": 61.2, "std": 0.08} and summary["complete"]
    md = (folder / "results.md").read_text()
    assert "| bbox AP | 41.0 ± 1.4 | 41.2 ± 0.12 |" in md and "mean ± std over 2 seed(s)" in md
    assert "does not say whether that model used multi-crop" in md


def test_no_reference_column_when_the_pretraining_is_not_the_papers(tmp_path, fake_slurm):
    folder = tmp_path / "p"
    protocol = _fake_protocol(folder, "imagenet_800ep", ["linear"])
    protocol["reference"]["why_not"] = "the pretraining differs from the preset 'imagenet_800ep' (optim.epochs)"
    write_json(folder / "protocol.json", protocol)
    _complete(folder / "pretrain")
    _complete(folder / "linear" / "last", {"top1": 10.0, "top5": 50.0})
    summary = R.write_report(folder)
    assert summary["classification"][0]["reference"] is None and summary["complete"]
    md = (folder / "results.md").read_text()
    assert "paper (INTL)" not in md and "No reference column: the pretraining differs" in md


def test_reading_a_folder_that_is_not_a_protocol_says_so(tmp_path, capsys):
    assert P.main(["--status", str(tmp_path)]) == 2
    assert "is not a protocol folder (no protocol.json)" in capsys.readouterr().err


def test_the_composed_eval_configs_are_the_stages_own(tiny_synthetic, workdir):
    """The protocol composes each evaluation exactly as `submit <stage>` would with the same overrides."""
    proto = P.plan(_args("--cluster", "local", "--evals", "semi10", *tiny_protocol_args(tiny_synthetic)))
    node = proto.node("semi10/last")
    overrides = shlex.split(node.description)
    assert node.job.config == P._container("semi", overrides)
    assert compose_config("semi", overrides).subset.percent == 10
