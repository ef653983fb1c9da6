"""The `submit` launcher without Slurm: stage registry, compose_config, errors before queueing, --dry-run,
run-folder semantics, and real local multi-process jobs (submitit's LocalExecutor, gloo on CPU).

The `counter` stage (tests/stage_fixtures.py) is registered through INTL_SUBMIT_EXTRA_STAGES; the real
pretraining stage is exercised at the end with tiny overrides.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from slurm import executor, stages
from slurm.errors import SubmitError
from slurm.submit import main

TESTS = Path(__file__).resolve().parents[1]  # tests/: stage_fixtures lives there
ROOT = TESTS.parent


def _err(capsys) -> str:
    return capsys.readouterr().err






# ----------------------------------------------------------------------------------- registry / compose
def test_stage_module_that_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "broken_stage_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(stages.EXTRA_STAGES_ENV, f"broken=broken_stage_mod:run@{tmp_path}")
    with pytest.raises(SubmitError, match="fails to import.*no_such_dependency_xyz"):
        stages.get_stage("broken").preflight_function()


def test_stage_configs_compose_through_the_registry():
    assert stages.compose_stage_config("pretrain", ["name=abc"]).name == "abc"
    with pytest.raises(SubmitError, match="unknown stage 'pretrian'.*pretrain"):
        stages.compose_stage_config("pretrian", [])
    with pytest.raises(SubmitError, match="detectron2 config file"):
        stages.compose_stage_config("detection", [])


def test_extra_stage_env_is_validated(monkeypatch):
    monkeypatch.setenv(stages.EXTRA_STAGES_ENV, "broken-entry")
    with pytest.raises(SubmitError, match="malformed"):
        stages.all_stages()
    monkeypatch.setenv(stages.EXTRA_STAGES_ENV, "ghost=no_such_module_xyz:run@/tmp")
    with pytest.raises(SubmitError, match="not available.*no_such_module_xyz"):
        stages.get_stage("ghost")


def test_product_stages_are_registered():
    assert set(stages.STAGES) == {"pretrain", "linear", "semi", "knn", "embed", "detection", "doctor"}
    assert stages.get_stage("pretrain").module == "pretrain.train"


# ---------------------------------------------------------------------------------- cluster resolution
def test_auto_cluster_follows_sbatch_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert executor.resolve_cluster("auto") == "local"
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert executor.resolve_cluster("auto") == "slurm"
    assert executor.resolve_cluster("local") == "local"


@pytest.mark.parametrize("gres,gpus", [("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("(null)", 0),
                                       ("gpu:v100:2,gpu:a100:2", 4), ("tmpfs:100,gpu:8", 8)])
def test_parse_gres_gpus(gres, gpus):
    assert executor.parse_gres_gpus(gres) == gpus


def test_gpus_beyond_partition_is_refused():
    info = executor.PartitionInfo("debug", nodes=1, max_gpus_per_node=2)
    executor.check_against_partition(executor.Resources("slurm", nodes=1, gpus=2), info)
    with pytest.raises(SubmitError, match="offer at most 2 GPU"):
        executor.check_against_partition(executor.Resources("slurm", nodes=1, gpus=4), info)
    with pytest.raises(SubmitError, match="have no GPUs"):
        executor.check_against_partition(executor.Resources("slurm", gpus=1), executor.PartitionInfo("cpu", 4, 0))
    with pytest.raises(SubmitError, match="has 1 node"):
        executor.check_against_partition(executor.Resources("slurm", nodes=2, gpus=1), info)


def test_slurm_parameters_one_task_per_gpu():
    p = executor.slurm_parameters(executor.Resources("slurm", nodes=2, gpus=4, cpus_per_gpu=8, partition="gpu"))
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"]) == (2, 4, 4, 8)
    assert p["srun_args"] == ["--cpus-per-task=8"] and p["additional_parameters"] == {"requeue": True}


def test_distributed_env_from_a_slurm_step(monkeypatch):
    from slurm.jobs import export_distributed_env

    for key in ("SUBMITIT_EXECUTOR", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    slurm_env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)
    out = export_distributed_env()
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    assert out["MASTER_ADDR"] == "gpu07" and os.environ["RANK"] == "3"
    assert 20000 <= int(out["MASTER_PORT"]) <= 32767


def test_rendezvous_ports_stay_below_the_ephemeral_range(monkeypatch):
    """The port of a job's rendezvous is never one the kernel hands to client sockets (the cause of an
    "Address already in use" rendezvous failure seen in the demo test)."""
    from pathlib import Path

    from slurm.jobs import export_distributed_env

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = []
    for job_id in range(200):
        for key in ("MASTER_PORT", "SUBMITIT_EXECUTOR"):
            monkeypatch.delenv(key, raising=False)
        for k, v in {"SLURM_JOB_ID": str(1000 + job_id), "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                     "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                     "SLURM_JOB_NODELIST": "vm"}.items():
            monkeypatch.setenv(k, v)
        ports.append(int(export_distributed_env()["MASTER_PORT"]))
    print(f"200 jobs: ports {min(ports)}-{max(ports)}, ephemeral range starts at {low}")
    assert max(ports) < low and len(set(ports)) > 150


def test_no_launcher_env_means_one_process(monkeypatch):
    from slurm.jobs import export_distributed_env

    for key in ("SUBMITIT_EXECUTOR", "SLURM_PROCID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    assert export_distributed_env() == {}


# ------------------------------------------------------------------------------- CLI errors, dry run
def test_unknown_stage_and_missing_stage(counter_env, capsys, monkeypatch):
    assert main(["pretrian", "--cluster", "local"]) == 2
    assert "unknown stage 'pretrian'" in _err(capsys)
    monkeypatch.setenv(stages.EXTRA_STAGES_ENV, "later=transfer.not_built_yet:run@/tmp")
    assert main(["later", "--cluster", "local"]) == 2
    assert "not available" in _err(capsys)


@pytest.mark.parametrize("argv,message", [
    (["counter", "no_such_key=1"], "does not compose"),
    (["counter", "data.root=/no/such/data"], "data.root=/no/such/data is not a folder"),
    (["counter", "--gpus", "0"], "--gpus (per node) must be at least 1"),
    (["counter", "--nodes", "2"], "--cluster local runs processes on this machine only"),
    (["counter", "--mem-per-gpu", "lots"], "not a Slurm memory size"),
    (["counter", "--seeds", "3"], "detection options"),
    (["counter", "run_dir=/proc/intl_no_write/run"], "cannot write in /proc"),
])
def test_bad_input_is_refused_before_queueing(counter_env, capsys, argv, message):
    assert main(argv + ["--cluster", "local"]) == 2
    assert message in _err(capsys)
    assert not (counter_env / "outputs").exists()


def test_run_dir_under_a_file_is_refused(counter_env, capsys):
    (counter_env / "afile").write_text("x")
    assert main(["counter", "--cluster", "local", f"run_dir={counter_env}/afile/run"]) == 2
    assert "is not a folder" in _err(capsys)


def test_slurm_without_controller_is_a_clear_error(counter_env, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(counter_env))  # no sbatch at all
    assert main(["counter", "--cluster", "slurm"]) == 2
    assert "needs Slurm's sbatch on PATH" in _err(capsys)


def test_dry_run_prints_sbatch_and_writes_nothing(counter_env, capsys):
    assert main(["counter", "--cluster", "slurm", "--gpus", "2", "--partition", "gpu", "--time", "90",
                 "--cpus-per-gpu", "4", "--dry-run", "steps=3"]) == 0
    out = capsys.readouterr().out
    for line in ("#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@", "srun", "steps: 3", "world size 2"):
        assert line in out, line
    assert "nothing was submitted" in out
    assert not (counter_env / "outputs").exists()


def test_env_and_collective_timeout_are_shown_in_the_dry_run(counter_env, capsys):
    assert main(["counter", "--cluster", "slurm", "--nodes", "2", "--gpus", "2", "--dry-run",
                 "--env", "NCCL_SOCKET_IFNAME=ib0", "--env", "NCCL_DEBUG=INFO", "--collective-timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert ("submit: collective timeout 5 min; every task exports NCCL_SOCKET_IFNAME=ib0 NCCL_DEBUG=INFO "
            "INTL_COLLECTIVE_TIMEOUT_MIN=5") in out
    assert "#SBATCH --nodes=2" in out and "nothing was submitted" in out
    assert main(["counter", "--cluster", "local", "--dry-run"]) == 0
    assert "collective timeout 30 min (the default; --collective-timeout MIN)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--env", "NCCL_SOCKET_IFNAME"], "is not KEY=VALUE"),
    (["--env", "1BAD=x"], "is not KEY=VALUE"),
    (["--env", "MASTER_ADDR=10.0.0.1"], "MASTER_ADDR is set by the launcher"),
    (["--env", "SLURM_NTASKS=3"], "SLURM_NTASKS is set by the launcher"),
    (["--env", "INTL_COLLECTIVE_TIMEOUT_MIN=3"], "use --collective-timeout 3"),
    (["--env", "A=1", "--env", "A=2"], "--env A is given twice"),
    (["--collective-timeout", "0"], "--collective-timeout must be a positive number of minutes"),
])
def test_bad_env_or_timeout_is_refused(counter_env, capsys, argv, message):
    assert main(["counter", "--cluster", "local", "--dry-run", *argv]) == 2
    assert message in _err(capsys)


def test_a_task_exports_the_jobs_env_first_and_a_requeue_keeps_it(monkeypatch):
    """StageJob.__call__ exports job.env before the stage runs (so before init_distributed); checkpoint() copies it."""
    from slurm.jobs import StageJob

    monkeypatch.syspath_prepend(str(TESTS))
    for key in ("SUBMITIT_EXECUTOR", "SLURM_PROCID", "SLURM_JOB_ID", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)
    job = StageJob(stages.StageSpec("seen", "stage_fixtures", function="environment_seen"), {"run_dir": "/x"})
    job.env = {"NCCL_SOCKET_IFNAME": "ib0", "INTL_COLLECTIVE_TIMEOUT_MIN": "2"}
    seen = job()
    assert seen["NCCL_SOCKET_IFNAME"] == "ib0" and seen["INTL_COLLECTIVE_TIMEOUT_MIN"] == "2"
    again = job.checkpoint().function
    assert again.env == job.env and again is not job


def test_dry_run_local(counter_env, capsys):
    assert main(["counter", "--cluster", "local", "--gpus", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"tasks_per_node": 2' in out and "nothing was submitted" in out
    assert not (counter_env / "outputs").exists()


def test_pretrain_dry_run_checks_batch_and_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--cluster", "local", "--gpus", "2", "--dry-run", "data.root=/no/such/folder"]) == 2
    err = _err(capsys)
    assert "pretrain stage rejects this setup" in err and "/no/such/folder" in err and "fix:" in err
    assert main(["pretrain", "--cluster", "local", "--gpus", "3", "--dry-run",
                 f"data.root={ROOT}/data/synthetic/classification", "optim.batch_size=64"]) == 2
    assert "not divisible" in _err(capsys)


def test_pretrain_data_that_cannot_train_is_refused_before_queueing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "train").mkdir(parents=True)  # data.split=train
    assert main(["pretrain", "--cluster", "local", "--dry-run", f"data.root={tmp_path / 'empty'}"]) == 2
    err = _err(capsys)
    assert "pretrain stage rejects this setup" in err and "no usable class folders" in err
    few = tmp_path / "few" / "train" / "cls"
    few.mkdir(parents=True)
    from PIL import Image

    for k in range(5):
        Image.new("RGB", (8, 8)).save(few / f"{k}.png")
    assert main(["pretrain", "--cluster", "local", "--dry-run", f"data.root={tmp_path / 'few'}",
                 "optim.batch_size=8"]) == 2
    assert "has 5 images, fewer than one global batch of 8" in _err(capsys)


NATIVE_DRY_RUNS = {
    # method, preset: the published values the resolved config must show (barlowtwins main.py, vicreg main_vicreg.py)
    ("barlow_twins", "barlow_twins_imagenet_1000ep"): ["lambd: 0.0051", "bias_base_lr: 0.0048"],
    ("vicreg", "vicreg_imagenet_1000ep"): ["sim_coeff: 25.0", "std_coeff: 25.0", "cov_coeff: 1.0",
                                           "bias_base_lr: null"],
}


@pytest.mark.parametrize("method,preset", sorted(NATIVE_DRY_RUNS))
def test_native_preset_dry_run_prints_the_published_recipe(tmp_path, monkeypatch, capsys, method, preset):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "imagenet" / "train" / "n0"  # one global batch of 2048 images (links to one tiny file)
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    for k in range(2048):
        (images / f"{k}.png").symlink_to(tmp_path / "one.png")
    assert main(["pretrain", "--cluster", "slurm", "--nodes", "2", "--gpus", "8", "--dry-run", f"method={method}",
                 f"pretrain/preset={preset}", f"data.root={tmp_path / 'imagenet'}"]) == 0
    out = capsys.readouterr().out
    for line in (f"name: {method}", "name: lars", "epochs: 1000", "batch_size: 2048", "base_lr: 0.2",
                 "weight_decay: 1.0e-06", "exclude: bias_and_norm", "momentum: 0.9", "lars_eta: 0.001",
                 "warmup_epochs: 10", "final_lr_ratio: 0.001", "arch: resnet50", f"name: {preset}",
                 "#SBATCH --nodes=2", "world size 16", "nothing was submitted", *NATIVE_DRY_RUNS[method, preset]):
        assert line in out, line
    assert "  - 8192\n  - 8192\n  - 8192\n" in out
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"\x80\x04truncated"])
def test_pretrain_resume_from_an_unreadable_checkpoint_is_refused_before_queueing(tmp_path, monkeypatch, capsys,
                                                                                  content):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "pretrain" / "broken"
    run.mkdir(parents=True)
    (run / "last.pth").write_bytes(content)
    argv = ["pretrain", "--cluster", "local", "--dry-run", "--name", "broken",
            f"data.root={ROOT}/data/synthetic/classification"]
    assert main(argv) == 2
    err = _err(capsys)
    assert f"would resume from {run / 'last.pth'}, which is unusable" in err and "could not be read" in err
    assert "fix: move last.pth away" in err
    assert main(argv + ["--new"]) == 0  # a fresh run does not read it
    assert "name: broken_2" in capsys.readouterr().out


@pytest.mark.parametrize("cluster", ["local", "slurm"])
def test_pretrain_resume_from_a_cut_last_pth_falls_back_and_only_none_usable_is_refused(tmp_path, monkeypatch,
                                                                                         capsys, cluster):
    """What the stage will do (common.checkpoint.find_resume_point), decided before queueing: a cut last.pth
    with a readable last.prev.pth is queued, saying from which step; with both unreadable, refused naming both."""
    from common.checkpoint import save_checkpoint

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "pretrain" / "cut"
    for step in (4, 6):
        save_checkpoint({"model": {}, "epoch": 0, "step": step, "config": {}}, run / "last.pth", keep_previous=True)
    data = (run / "last.pth").read_bytes()
    (run / "last.pth").write_bytes(data[: len(data) // 2])  # a full disk or a partial copy
    argv = ["pretrain", "--cluster", cluster, "--dry-run", "--name", "cut",
            f"data.root={ROOT}/data/synthetic/classification"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    fallback = next(line for line in out.splitlines() if "checkpoint fallback" in line)
    print(fallback)
    assert fallback.startswith("submit: checkpoint fallback: resuming from last.prev.pth (step 4) instead: "
                               "last.pth could not be read") and "nothing was submitted" in out
    (run / "last.prev.pth").write_bytes(b"garbage")
    assert main(argv) == 2
    err = _err(capsys)
    print(err)
    assert "last.pth could not be read" in err and "last.prev.pth could not be read" in err
    assert "fix: move last.pth, last.prev.pth away" in err


# ---------------------------------------------------------------------------------- run folders
def test_complete_run_does_nothing(counter_env, capsys):
    run = counter_env / "outputs" / "counter" / "counter"
    run.mkdir(parents=True)
    (run / "COMPLETE").write_text("{}\n")
    assert main(["counter", "--cluster", "local"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert not (run / "submissions.jsonl").exists()


def test_existing_folder_resumes_and_new_picks_a_free_name(counter_env, capsys):
    run = counter_env / "outputs" / "counter" / "counter"
    run.mkdir(parents=True)
    (run / "last.pth").write_text("")
    assert main(["counter", "--cluster", "local", "--dry-run"]) == 0
    assert "resuming that run" in capsys.readouterr().out
    assert main(["counter", "--cluster", "local", "--dry-run", "--new"]) == 0
    out = capsys.readouterr().out
    assert "new run in" in out and "counter_2" in out and "name: counter_2" in out


def test_run_with_a_job_still_running_is_not_submitted_twice(counter_env, capsys):
    import socket

    run = counter_env / "outputs" / "counter" / "counter"
    run.mkdir(parents=True)
    (run / "submissions.jsonl").write_text(json.dumps({"cluster": "local", "host": socket.gethostname(),
                                                       "job_ids": [str(os.getpid())]}) + "\n")
    assert main(["counter", "--cluster", "local"]) == 2
    err = _err(capsys)
    assert f"already has a job queued or running: {os.getpid()} (local process running)" in err
    assert len((run / "submissions.jsonl").read_text().splitlines()) == 1


# -------------------------------------------------------------------------------- local processes


# ------------------------------------------------------------------------------ the real pretraining


# ------------------------------------------------------------------------- detection: --seeds flow


@pytest.mark.parametrize("extra,message", [
    (["SOLVER.MAX_ITER"], "odd number"),
    (["SOLVER.MAX_ITER=10"], "no '='"),
    (["OUTPUT_DIR", "/x"], "OUTPUT_DIR is set by the launcher"),
    (["SEED", "3"], "SEED is set by the launcher"),
])
def test_detection_overrides_are_checked(fakedet_env, capsys, extra, message):
    assert main(["fakedet", "--cluster", "local", "--config-file", str(fakedet_env), *extra]) == 2
    assert message in _err(capsys)


def test_detection_config_file_is_required_and_preflighted(fakedet_env, capsys):
    assert main(["fakedet", "--cluster", "local"]) == 2
    assert "needs --config-file" in _err(capsys)
    assert main(["fakedet", "--cluster", "local", "--config-file", "nope.yaml"]) == 2
    assert "does not exist" in _err(capsys)
    fakedet_env.write_text("- a list\n")
    assert main(["fakedet", "--cluster", "local", "--config-file", str(fakedet_env)]) == 2
    err = _err(capsys)
    assert "rejects this setup" in err and "not a YAML mapping" in err


def test_detection_dry_run_one_job_per_seed(fakedet_env, capsys):
    assert main(["fakedet", "--cluster", "slurm", "--gpus", "2", "--seeds", "3", "--dry-run",
                 "--config-file", str(fakedet_env), "SOLVER.MAX_ITER", "10"]) == 0
    out = capsys.readouterr().out
    run = fakedet_env.parent / "outputs" / "detection" / "det"
    for k in range(3):
        assert f"SOLVER.MAX_ITER 10 SEED {k} OUTPUT_DIR {run / f'seed{k}'}" in out
    assert "3 job(s), as an array" in out and "#SBATCH --gpus-per-node=2" in out
    assert not run.exists()




def test_real_detection_stage_checks_the_batch_against_the_world_size_before_queueing(synthetic_root, capsys,
                                                                                       monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the synthetic config's dataset paths are relative to the repository
    config = ROOT / "configs" / "detection" / "synthetic_R_50_C4.yaml"  # SOLVER.IMS_PER_BATCH 4
    argv = ["detection", "--cluster", "local", "--gpus", "3", "--dry-run", "--name", "world_size_check",
            "--config-file", str(config)]
    assert main(argv) == 2
    assert "SOLVER.IMS_PER_BATCH=4 is not divisible by the world size 3" in _err(capsys)
    argv[4] = "2"
    assert main(argv) == 0




def test_folder_without_a_checkpoint_is_not_said_to_resume_from_one(counter_env, capsys):
    run = counter_env / "outputs" / "counter" / "counter"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: counter\n")  # an attempt that failed before its first checkpoint
    assert main(["counter", "--cluster", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "holds no checkpoint" in out and "starts from the beginning" in out
    assert "from its last checkpoint" not in out


def _weights_file(tmp_path: Path, kind: str) -> Path:
    import pickle

    import torch
    import torchvision

    if kind == "non-pickle":
        path = tmp_path / "w.pkl"
        path.write_text("this is not a weights file\n")
    elif kind == "pth":
        path = tmp_path / "w.pth"
        torch.save({"model": torchvision.models.resnet18().state_dict()}, path)
    else:  # a ResNet-18 in detectron2's pickle format, as intl-convert writes it
        path = tmp_path / "r18.pkl"
        sd = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
        with open(path, "wb") as f:
            pickle.dump({"model": sd, "__author__": "test", "matching_heuristics": True}, f)
    return path


@pytest.mark.parametrize("kind", ["non-pickle", "pth", "resnet18-pkl"])
def test_real_detection_stage_checks_the_weights_before_queueing(synthetic_root, capsys, monkeypatch, tmp_path,
                                                                 kind):
    monkeypatch.chdir(ROOT)
    weights = _weights_file(tmp_path, kind)
    argv = ["detection", "--cluster", "local", "--dry-run", "--name", f"w-{kind}",
            "--config-file", str(ROOT / "configs" / "detection" / "synthetic_R_50_C4.yaml"),
            "MODEL.WEIGHTS", str(weights)]
    assert main(argv) == 2
    err = _err(capsys)
    assert "detection stage rejects this setup" in err and "fix:" in err
    assert ("could not be loaded" in err) if kind == "non-pickle" else ("do not fit the backbone" in err), err


def test_real_detection_stage_accepts_a_converted_resnet50(synthetic_root, capsys, monkeypatch, tmp_path):
    import torch
    import torchvision

    from transfer.convert import convert

    monkeypatch.chdir(ROOT)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    convert(tmp_path / "r50.pth", tmp_path / "r50.pkl")
    argv = ["detection", "--cluster", "local", "--dry-run", "--name", "w-ok",
            "--config-file", str(ROOT / "configs" / "detection" / "synthetic_R_50_C4.yaml"),
            "MODEL.WEIGHTS", str(tmp_path / "r50.pkl")]
    assert main(argv) == 0, _err(capsys)


def test_embed_and_knn_from_a_dump_dry_run_without_image_folders(tmp_path, monkeypatch, capsys):
    """`submit embed` is a stage; `submit knn knn.features=<embed run>` needs no image folder (none is read),
    while a missing data folder is still refused before queueing when the images are read."""
    monkeypatch.chdir(tmp_path)
    dump = tmp_path / "outputs" / "embed" / "embed"
    dump.mkdir(parents=True)
    assert main(["knn", "--cluster", "local", "--dry-run", f"knn.features={dump}", "model.arch=resnet18",
                 "data.root=/no/such/folder"]) == 0
    assert main(["knn", "--cluster", "local", "--dry-run", "model.arch=resnet18", "data.root=/no/such/folder"]) == 2
    assert "/no/such/folder/train" in capsys.readouterr().err
    assert main(["embed", "--cluster", "local", "--dry-run", "model.arch=resnet18", "data.root=/no/such/folder"]) == 2
    assert main(["embed", "--cluster", "local", "--dry-run", "model.arch=resnet18", "eval/data=stl10",
                 f"data.root={tmp_path}"]) == 2
    assert "stl10_binary/train_X.bin, which does not exist" in capsys.readouterr().err
