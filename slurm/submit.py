"""`submit <stage> [options] [overrides...]`: run a stage on Slurm or as local processes.

    submit pretrain --nodes 1 --gpus 2 [--cluster auto|slurm|local] [--partition P] [--time MIN]
                    [--env KEY=VALUE ...] [--collective-timeout MIN]
                    [--name NAME] [--dry-run] [--wait] [--new] key=value ...
    submit detection --config-file F --seeds 3 --gpus 2 --wait SOLVER.MAX_ITER 1000 ...
    submit doctor --nodes 2 --gpus 8 data.root=/datasets/imagenet       # checks the set-up (slurm/doctor.py)

One task per GPU (``--gpus`` is per node); without CUDA every slot is a CPU process using gloo.
``auto`` means Slurm when ``sbatch`` is on PATH, else local processes. Every run lives in
``outputs/<stage>/<name>/``: submitting into an existing folder resumes it, a complete run does nothing,
``--new`` starts a fresh run under the next free name. Bad input is reported before anything is queued.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.atomic import check_writable
from common.checkpoint import CheckpointError, find_resume_point, problem_of, resume_candidates
from common.distributed import DEFAULT_TIMEOUT_MIN, TIMEOUT_ENV
from common.errors import UserError
from common.runlog import is_complete, save_config

from .errors import SubmitError
from .executor import (
    CLUSTERS,
    DEFAULT_TIME_MIN,
    SLURM,
    Resources,
    check_against_partition,
    check_slurm_reachable,
    local_cpu_env,
    local_parameters,
    make_executor,
    partition_info,
    render_sbatch,
    resolve_cluster,
    task_env,
    validate,
)
from .jobs import DetectionJob, StageJob
from .runs import (
    COMPLETE,
    NEW,
    RESUME,
    SUBMITIT_DIR,
    RunState,
    active_jobs,
    next_free_dir,
    record_submission,
    run_lock,
    run_state,
)
from .stages import DETECTION, StageSpec, compose_stage_config, get_stage

POLL_ENV = "INTL_SUBMIT_POLL_S"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="submit", description="Run a pipeline stage on Slurm or as local processes, one task per GPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stages: pretrain, linear, semi, knn, embed (Hydra key=value overrides), detection (detectron2 KEY "
               "VALUE overrides, --config-file, --seeds), doctor (the set-up check before a long run: data.root=..., "
               "disk.min_free_gb=...). Put overrides that start with '-' after '--'.")
    p.add_argument("stage",
                   help="pretrain | linear | semi | knn | embed | detection | doctor (or `submit protocol ...`)")
    p.add_argument("overrides", nargs="*", help="Hydra key=value (detection: KEY VALUE pairs)")
    add_resource_arguments(p)
    j = p.add_argument_group("run")
    j.add_argument("--name", help="run name: the run folder is outputs/<stage>/<name> (Hydra key `name`)")
    j.add_argument("--new", action="store_true", help="start a fresh run even if the run folder exists")
    j.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the sbatch parameters; submit nothing")
    j.add_argument("--wait", action="store_true",
                   help="block until the job ends, stream its rank-0 log, exit with its status")
    d = p.add_argument_group("detection")
    d.add_argument("--config-file", help="detectron2 YAML config (detection only)")
    d.add_argument("--seeds", type=int, default=1, help="number of seeds, one run each (detection only)")
    return p


def add_resource_arguments(p: argparse.ArgumentParser) -> None:
    """The resource options every stage (and `submit protocol`) takes."""
    r = p.add_argument_group("resources")
    r.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    r.add_argument("--gpus", type=int, default=1, help="GPUs per node = processes per node (default 1)")
    r.add_argument("--cluster", default="auto", choices=CLUSTERS,
                   help="slurm, local processes, or auto (slurm when sbatch is on PATH)")
    r.add_argument("--partition", help="Slurm partition (default: the cluster's default partition)")
    r.add_argument("--time", type=int, default=DEFAULT_TIME_MIN,
                   help=f"time limit per job in minutes; longer runs requeue themselves (default {DEFAULT_TIME_MIN})")
    r.add_argument("--cpus-per-gpu", type=int, help="CPU cores per task (Slurm --cpus-per-task)")
    r.add_argument("--mem-per-gpu", help="memory per GPU, e.g. 32G (Slurm --mem-per-gpu)")
    r.add_argument("--account", help="Slurm account")
    r.add_argument("--qos", help="Slurm quality of service")
    r.add_argument("--constraint", help="Slurm node constraint, e.g. volta32gb")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="exported in every task before the process group starts, e.g. --env NCCL_SOCKET_IFNAME=ib0 "
                        "--env NCCL_DEBUG=INFO (repeat for each variable)")
    r.add_argument("--collective-timeout", type=float, metavar="MIN",
                   help="minutes a collective (and the rendezvous) waits for a missing rank before the job fails "
                        f"(default {DEFAULT_TIMEOUT_MIN:g}); sets INTL_COLLECTIVE_TIMEOUT_MIN in every task")


# `submit <command> ...` that are not stages: their modules are loaded by name, like the stages' (so that
# `submit pretrain` does not import them); each has main(argv) with the arguments after the command.
COMMANDS = {"protocol": "slurm.protocol"}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in COMMANDS:
        import importlib

        return importlib.import_module(COMMANDS[args_list[0]]).main(args_list[1:])
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        _import_stage_module(args.stage)
        status = _submit(args, list(sys.argv[1:] if argv is None else argv))
        gc.collect()  # submitit's job objects clean up now, not during interpreter shutdown
        return status
    except UserError as e:  # SubmitError, ConfigError, a stage's own check: the message names the fix
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before anything was queued (waiting is handled in _wait_or_report)
        print("\nsubmit: interrupted", file=sys.stderr)
        return 130


def _import_stage_module(stage: str) -> None:
    """Imports the stage module (for its preflight check) from a shallow frame: a library imported with it
    can keep the importing frames alive, and frames deep inside _submit would keep submitit's job objects
    alive until interpreter shutdown, where their __del__ fails noisily. Errors are reported by _submit."""
    import importlib

    try:
        importlib.import_module(get_stage(stage).module)
    except Exception:  # noqa: BLE001 - _submit reports unknown/missing stages with their proper message
        pass


# ------------------------------------------------------------------------------------------ planning
@dataclass
class Plan:
    """What will be submitted: the jobs, where they write, and what to print for --dry-run."""

    spec: StageSpec
    state: RunState
    jobs: list          # StageJob / DetectionJob objects, not yet submitted
    description: str    # the resolved config (YAML) or the detection commands
    labels: list[str]   # one per job, for messages
    fallback: str | None = None  # the run resumes from an older checkpoint than last.pth: what and why


def _plan_hydra(spec: StageSpec, args) -> Plan:
    if args.config_file is not None or args.seeds != 1:
        raise SubmitError(f"--config-file and --seeds are detection options; stage {spec.name!r} takes Hydra "
                          "key=value overrides")
    overrides = ([f"name={args.name}"] if args.name else []) + list(args.overrides)
    cfg = compose_stage_config(spec.name, overrides)
    for key in ("name", "run_dir"):
        if key not in cfg:
            raise SubmitError(f"the {spec.name} config has no top-level key {key!r} (ARCHITECTURE.md requires "
                              "name, run_dir, seed); fix: add it to the stage config")
    try:
        run_dir = _absolute(str(cfg.run_dir))
        state = run_state(run_dir)
        if args.new and state.state != NEW:
            fresh = next_free_dir(run_dir)
            if run_dir.name == str(cfg.name):
                cfg.name = fresh.name
            run_dir, state = fresh, run_state(fresh)
        cfg.run_dir = str(run_dir)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise SubmitError(f"the {spec.name} config leaves {', '.join(missing)} without a value (???); "
                              f"fix: pass {missing[0]}=<value>")
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise SubmitError(f"the {spec.name} config does not resolve: {e}; fix: check the interpolations and "
                          "the overrides") from None
    _preflight(spec, container, world_size=args.nodes * args.gpus)
    _check_inputs(spec, cfg)
    fallback = _check_resume_checkpoint(spec, state)
    text = OmegaConf.to_yaml(OmegaConf.create(container))
    return Plan(spec, state, [StageJob(spec, container)], text, [str(run_dir)], fallback)


def _plan_detection(spec: StageSpec, args) -> Plan:
    if not args.config_file:
        raise SubmitError("detection needs --config-file F (a detectron2 YAML, e.g. one under configs/detection/)")
    config_file = _absolute(args.config_file)
    if not config_file.is_file():
        raise SubmitError(f"--config-file {args.config_file} does not exist; fix: pass a detectron2 YAML config")
    if args.seeds < 1:
        raise SubmitError(f"--seeds must be at least 1, got {args.seeds}")
    opts = list(args.overrides)
    glued = [o for o in opts if re.match(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*=", o)]
    if glued:
        raise SubmitError(f"detection overrides are KEY VALUE pairs (no '='), got {glued}; "
                          "fix: write SOLVER.BASE_LR 0.02, not SOLVER.BASE_LR=0.02")
    if len(opts) % 2:
        raise SubmitError(f"detection overrides are detectron2 KEY VALUE pairs, got an odd number: {opts}; "
                          "fix: e.g. SOLVER.MAX_ITER 1000 (values starting with '-' go after '--')")
    keys = opts[0::2]
    bad = [k for k in keys if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", k)]
    if bad:
        raise SubmitError(f"{bad} are not detectron2 config keys (KEY VALUE pairs, e.g. SOLVER.MAX_ITER 1000); "
                          "fix: check the order of the overrides")
    for reserved, how in (("OUTPUT_DIR", "--name"), ("SEED", "--seeds")):
        if reserved in keys:
            raise SubmitError(f"{reserved} is set by the launcher (outputs/detection/<name>/seed<k>); "
                              f"fix: drop it and use {how}")
    _preflight(spec, str(config_file), opts, world_size=args.nodes * args.gpus)
    name = args.name or config_file.stem
    run_dir = _absolute(str(Path("outputs") / "detection" / name))
    if args.new and run_state(run_dir).state != NEW:
        run_dir = next_free_dir(run_dir)
    from transfer.detection.aggregate import seed_runs  # the one mapping seed k -> (seed<k>/, SEED k)

    runs = [(out, extra) for out, extra in seed_runs(run_dir, args.seeds) if not is_complete(out)]
    state = run_state(run_dir)
    if not runs:
        state = RunState(run_dir, COMPLETE, why_complete=f"all {args.seeds} seed folders are COMPLETE")
    elif state.state == COMPLETE:  # a top-level COMPLETE but more seeds asked for
        state = RunState(run_dir, RESUME)
    jobs = [DetectionJob(spec, str(config_file), opts + list(extra), str(out)) for out, extra in runs]
    lines = [f"python -m transfer.detection.train_net --config-file {shlex.quote(str(config_file))} --resume "
             + " ".join(shlex.quote(o) for o in j.opts + ["OUTPUT_DIR", j.output_dir]) for j in jobs]
    return Plan(spec, state, jobs, "\n".join(lines) + "\n", [j.output_dir for j in jobs])


def _absolute(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def _check_inputs(spec: StageSpec, cfg) -> None:
    for key in spec.input_paths:
        value = OmegaConf.select(cfg, key, default=None)
        if value in (None, "") or not isinstance(value, str):
            continue
        if not _absolute(value).exists():
            raise SubmitError(f"{key}={value} does not exist (needed by the {spec.name} stage); fix: pass "
                              f"{key}=<existing path>, or generate the embedded data with "
                              "`make data` (= `python -m common.synthetic --out data/synthetic`)")


def _check_resume_checkpoint(spec: StageSpec, state: RunState) -> str | None:
    """A resumed run's checkpoint must be usable, found as the stage will find it
    (``common.checkpoint.find_resume_point``: ``last.pth``, else the newest readable of ``last.prev.pth`` and
    the snapshots): returns what to tell about a fallback, or None; a SubmitError naming every file when none
    can be used."""
    if spec.resume_checkpoint is None or state.state != RESUME:
        return None
    path = state.run_dir / spec.resume_checkpoint
    try:
        point = find_resume_point(path)
    except CheckpointError as e:
        files = resume_candidates(path)
        what = f"this run would resume from {path}, which is unusable" if files == [path] else \
            "this run cannot be resumed"
        raise SubmitError(f"{what}: {problem_of(e)}; nothing was submitted; fix: move "
                          f"{', '.join(p.name for p in files)} away to restart the run from scratch, or pass --new "
                          "for a separate run") from None
    return point.describe() if point is not None and point.is_fallback else None


def _preflight(spec: StageSpec, *args, **kwargs) -> None:
    """The stage's own up-front check (config keys, batch divisible by the world size, data, weights)."""
    check = spec.preflight_function()
    if check is None:
        return
    try:
        import inspect

        accepted = inspect.signature(check).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if spec.kind == DETECTION:
            check(*args, **kwargs)
        else:
            check(OmegaConf.create(args[0]), **kwargs)
    except UserError as e:
        raise SubmitError(f"the {spec.name} stage rejects this setup: {e}") from None


# ---------------------------------------------------------------------------------------- submitting
def _submit(args, argv: list[str]) -> int:
    spec = get_stage(args.stage)
    plan = _plan_detection(spec, args) if spec.kind == DETECTION else _plan_hydra(spec, args)
    run_dir = plan.state.run_dir
    res = Resources(cluster=resolve_cluster(args.cluster), nodes=args.nodes, gpus=args.gpus, time_min=args.time,
                    job_name=f"intl-{spec.name}-{run_dir.name}", partition=args.partition,
                    cpus_per_gpu=args.cpus_per_gpu, mem_per_gpu=args.mem_per_gpu, account=args.account,
                    qos=args.qos, constraint=args.constraint, env=task_env(args.env, args.collective_timeout))
    validate(res)
    checked = _check_cluster(res, dry_run=args.dry_run)

    print(f"submit: stage {spec.name}, {res.cluster} cluster, {res.nodes} node(s) x {res.gpus} GPU slot(s) = "
          f"world size {res.world_size}")
    timeout = dict(res.env).get(TIMEOUT_ENV)
    print(f"submit: collective timeout {timeout or f'{DEFAULT_TIMEOUT_MIN:g}'} min"
          + ("" if timeout else " (the default; --collective-timeout MIN)")
          + (f"; every task exports {' '.join(f'{k}={shlex.quote(v)}' for k, v in res.env)}" if res.env else ""))
    print(f"submit: {plan.state.describe()}")
    if plan.fallback:
        print(f"submit: checkpoint fallback: {plan.fallback}")
    if plan.state.state == COMPLETE:
        if spec.kind == DETECTION:
            return _aggregate_detection(run_dir)
        return 0

    if args.dry_run:
        _print_dry_run(plan, res, run_dir, checked)
        return 0

    check_writable(run_dir, create=False)
    with run_lock(run_dir):  # check, submit and record as one step: two submits of a run cannot both queue
        active = active_jobs(run_dir)
        if active and not (args.wait and all(a.record.get("cluster") == SLURM for a in active)):
            raise SubmitError(f"this run already has a job queued or running: {', '.join(map(str, active))}; "
                              "nothing was submitted; fix: wait for it (or cancel it), or pass --new for a "
                              "separate run")
        if not active:
            folder, jobs = _queue(plan, res, run_dir, argv)
    if active:
        print(f"submit: this run already has job(s) {', '.join(map(str, active))}; waiting for them instead of "
              "submitting another")
        return _finish(spec, run_dir, _wait_or_report([_attach(a, run_dir) for a in active],
                                                       _resume_command(args, argv, run_dir)))
    for job, label in zip(jobs, plan.labels):
        print(f"submit: job {job.job_id} -> {label}")
        print(f"submit:   logs {job.paths.stdout} (rank 0; {folder}/{job.job_id}_<rank>_log.out|err for all)")
    if not args.wait:
        cancel = "scancel " + " ".join(j.job_id for j in jobs) if res.cluster == SLURM else \
            "kill -INT " + " ".join(j.job_id for j in jobs)
        print(f"submit: follow with `tail -f {jobs[0].paths.stdout}`; stop with `{cancel}`; submitting the same "
              "command again resumes the run")
        if spec.kind == DETECTION:
            print(f"submit: when all seeds are done: python -m transfer.detection.aggregate {run_dir}")
        return 0
    return _finish(spec, run_dir, _wait_or_report(jobs, _resume_command(args, argv, run_dir)))


def _queue(plan: Plan, res: Resources, run_dir: Path, argv: list[str]):
    """Writes the config of a new run, submits its jobs and records them (the caller holds the run lock)."""
    spec = plan.spec
    if spec.kind != DETECTION and plan.state.state == NEW:
        # A resumed run keeps the config.yaml it started with (the stage itself checks that the new
        # config may resume the checkpoint, and says what differs when it may not).
        save_config(run_dir, plan.jobs[0].config)
    folder = run_dir / SUBMITIT_DIR
    executor = make_executor(res, folder)
    command = "submit " + shlex.join(argv)
    for job in plan.jobs:
        job.command_line = command  # the tasks' provenance.json records this, not the submitit worker's argv
        job.env = dict(res.env)
    if res.cluster != SLURM:  # every task of every job runs at once on this machine: share its cores
        for job in plan.jobs:
            job.cpu_threads = max(1, (os.cpu_count() or 1) // (max(1, res.gpus) * len(plan.jobs)))
    if len(plan.jobs) == 1:
        jobs = [executor.submit(plan.jobs[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(j) for j in plan.jobs]
    record_submission(run_dir, {"stage": spec.name, "cluster": res.cluster, "host": socket.gethostname(),
                                "job_ids": [j.job_id for j in jobs], "nodes": res.nodes, "gpus": res.gpus,
                                "env": dict(res.env), "command": command,
                                "cwd": os.getcwd()})
    return folder, jobs


def _resume_command(args, argv: list[str], run_dir: Path) -> str:
    """The command that resumes this run: the same one, without --new and naming the run folder it chose."""
    if not args.new:
        return "submit " + shlex.join(argv)
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--name":
            skip = True
        elif a != "--new" and not a.startswith(("--name=", "name=")):
            kept.append(a)
    return "submit " + shlex.join([*kept, "--name", run_dir.name])


def _interrupt_on_hangup(signum, frame):
    raise KeyboardInterrupt


def _wait_or_report(jobs: list, resume: str) -> int:
    """wait_for(jobs); on Ctrl-C / SIGINT (and SIGTERM, SIGHUP: a closed terminal) a local job is cancelled (it
    runs in a session of its own, slurm/local.py, and would run on with nobody waiting) and one line says so and
    how to resume; a Slurm job is left queued or running and the message says how to follow or stop it."""
    import submitit

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt_on_hangup)
    try:
        return wait_for(jobs)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cancelling short
        slurm = [str(j.job_id) for j in jobs if isinstance(j, submitit.SlurmJob)]
        local = [j for j in jobs if not isinstance(j, submitit.SlurmJob)]
        for job in local:
            job.cancel()  # SIGINT to submitit's local controller: it stops its tasks (SIGINT, then SIGKILL)
        deadline = time.time() + 30
        while any(j.state == "RUNNING" for j in local) and time.time() < deadline:
            time.sleep(0.1)
        print(file=sys.stderr)
        if local:
            ids = " ".join(str(j.job_id) for j in local)
            if any(j.state == "RUNNING" for j in local):
                print(f"submit: interrupted: cancelled the local job(s) {ids}, still stopping after 30 s "
                      f"(`kill -9 {ids}` ends them); `{resume}` resumes the run from its last checkpoint",
                      file=sys.stderr)
            else:
                tasks = sum(j.num_tasks for j in local)
                print(f"submit: interrupted: cancelled the local job(s) {ids} (stopped, {tasks} process(es)); "
                      f"`{resume}` resumes the run from its last checkpoint", file=sys.stderr)
        if slurm:
            print(f"submit: interrupted: Slurm job(s) {' '.join(slurm)} keep running; follow with `tail -f "
                  f"{jobs[0].paths.stdout}`, stop with `scancel {' '.join(slurm)}`; the same command with --wait "
                  "waits for them again", file=sys.stderr)
        return 130
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _finish(spec: StageSpec, run_dir: Path, status: int) -> int:
    if status == 0 and spec.kind == DETECTION:
        return _aggregate_detection(run_dir)
    return status


def _attach(active, run_dir: Path):
    """A submitit handle on a Slurm job queued by an earlier `submit` of this run."""
    import submitit

    ntasks = int(active.record.get("nodes", 1)) * max(1, int(active.record.get("gpus", 1)))  # gpus 0: one CPU task
    return submitit.SlurmJob(folder=run_dir / SUBMITIT_DIR, job_id=active.job_id, tasks=list(range(ntasks)))


def _check_cluster(res: Resources, dry_run: bool) -> bool:
    """Slurm: the controller answers and the partition offers the GPUs. Returns whether it was checked."""
    if res.cluster != SLURM:
        return True
    try:
        check_slurm_reachable()
    except SubmitError:
        if dry_run:
            return False
        raise
    check_against_partition(res, partition_info(res.partition))
    return True


def _print_dry_run(plan: Plan, res: Resources, run_dir: Path, checked: bool) -> None:
    if plan.spec.kind == DETECTION:
        print(f"submit: {len(plan.jobs)} seed job(s), each running (in every task):")
    else:
        print("submit: resolved config:")
    print(plan.description, end="")
    folder = run_dir / SUBMITIT_DIR
    if res.cluster == SLURM:
        print(f"submit: sbatch script ({len(plan.jobs)} job(s)" + (", as an array" if len(plan.jobs) > 1 else "")
              + "):")
        print(render_sbatch(res, folder))
        if not checked:
            print("submit: note: no Slurm controller answers here, so partition limits were not checked")
    else:
        params = local_parameters(res)
        print(f"submit: local processes: {json.dumps(params)}, environment {json.dumps(local_cpu_env())} "
              f"(submitit LocalExecutor, logs in {folder})")
    print("submit: dry run: nothing was submitted and nothing was written")


# ------------------------------------------------------------------------------------------- waiting
class LogFollower:
    """Prints the lines appended to a set of files since the last call (the rank-0 logs)."""

    def __init__(self, paths: list[Path], prefix: str):
        self.offsets = {Path(p): 0 for p in paths}
        self.prefix = prefix
        self.partial = {Path(p): "" for p in paths}

    def poll(self, final: bool = False) -> None:
        for path, offset in self.offsets.items():
            try:
                with open(path, "r", errors="replace") as f:
                    f.seek(offset)
                    chunk = f.read()
                    self.offsets[path] = f.tell()
            except FileNotFoundError:
                continue
            text = self.partial[path] + chunk
            lines = text.split("\n")
            self.partial[path] = "" if final else lines.pop()
            for line in lines:
                if line.strip():
                    print(f"{self.prefix}{line.rstrip()}", flush=True)


def wait_for(jobs: list) -> int:
    """Blocks until every job ends, streaming rank-0 logs; 0 when all succeeded, 1 otherwise."""
    poll_s = float(os.environ.get(POLL_ENV, "5"))
    followers = [LogFollower([j.paths.stdout, j.paths.stderr], prefix=f"[{j.job_id} rank0] ") for j in jobs]
    states = {j.job_id: None for j in jobs}
    gone = {j.job_id: 0 for j in jobs}  # polls in a row a Slurm job was no longer in the queue
    start = time.time()
    print(f"submit: waiting for {len(jobs)} job(s) (Ctrl-C stops waiting)", flush=True)
    while True:
        all_done = True
        for job, follower in zip(jobs, followers):
            follower.poll()
            queued = _slurm_queue_state(job)
            gone[job.job_id] = gone[job.job_id] + 1 if queued is False else 0
            # Slurm: the result files exist and the scheduler has let the job go (so the next command sees
            # the run as it is), or the job left the queue without results (killed, cancelled; without
            # accounting submitit alone would wait for them forever).
            done = (job.done(force_check=True) and queued is not True) or gone[job.job_id] >= 3
            state = job.state
            if state != states[job.job_id]:
                states[job.job_id] = state
                print(f"submit: job {job.job_id} is {state} ({time.time() - start:.0f} s)", flush=True)
            all_done &= done
        if all_done:
            break
        time.sleep(poll_s)
    failures = 0
    for job, follower in zip(jobs, followers):
        follower.poll(final=True)
        missing = [k for k in range(job.num_tasks) if not _task_paths(job, k).result_pickle.exists()]
        if missing:
            failures += 1
            print(f"submit: job {job.job_id} FAILED ({job.state}): it ended without a result from task(s) {missing} "
                  "(killed, cancelled, out of memory or time?)", file=sys.stderr)
            print(f"submit:   logs: {job.paths.stdout} and {job.paths.stderr}", file=sys.stderr)
            continue
        try:
            results = job.results()
        except Exception as e:  # noqa: BLE001 - submitit re-raises the job's own exception; report, exit 1
            failures += 1
            print(f"submit: job {job.job_id} FAILED ({job.state}): {_job_error(e)}", file=sys.stderr)
            print(f"submit:   full logs: {job.paths.stdout} and {job.paths.stderr}", file=sys.stderr)
            continue
        summary = results[0] if results else None
        shown = json.dumps(summary, default=str)[:400] if summary is not None else "no results returned"
        print(f"submit: job {job.job_id} finished: {shown}")
    return 1 if failures else 0


def _task_paths(job, task: int):
    return job.paths if job.num_tasks == 1 else job.task(task).paths


def _slurm_queue_state(job) -> bool | None:
    """True while Slurm still lists the job (pending, running, completing), False once it does not,
    None when unknown (not a Slurm job, or squeue failed)."""
    import submitit

    if not isinstance(job, submitit.SlurmJob):
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue -j on a job the controller has already purged fails with "Invalid job id".
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())


def _job_error(e: Exception) -> str:
    """The exception line of the job's traceback inside submitit's FailedJobError message."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    end = next((i for i, ln in enumerate(lines) if ln.startswith("You can check full logs")), len(lines))
    body = [ln for ln in lines[:end] if ln and not set(ln) <= {"-"}]
    return body[-1] if body else f"{type(e).__name__}: {e}"


def _aggregate_detection(run_dir: Path) -> int:
    try:
        from transfer.detection.aggregate import aggregate
    except ImportError:
        print(f"submit: transfer.detection.aggregate is not available; aggregate later with "
              f"`python -m transfer.detection.aggregate {run_dir}`", file=sys.stderr)
        return 1
    aggregate(run_dir)
    table = run_dir / "results.md"
    print(f"submit: aggregated the seeds into {run_dir / 'results.json'} and {table}")
    if table.exists():
        print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
