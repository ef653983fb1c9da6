"""`submit protocol`: the paper's whole protocol as one submission, and its table at the end.

    submit protocol [--nodes N --gpus G --cluster ... as every stage] [--evals linear,knn,semi1,semi10,detection]
                    [--snapshots 100,200,400] [--snapshot-evals ...] [--eval-gpus N] [--detection-gpus N]
                    [--detection-seeds N] [--eval-time MIN] [--name NAME] [--dry-run] [--wait]
                    [pretraining key=value ...] [<eval>:key=value ...]
    submit protocol --status outputs/protocol/<name>       # which jobs are pending, running, done, failed; logs
    submit protocol --report outputs/protocol/<name>       # results.md / results.json again, any time

The job graph, one run folder per job under ``outputs/protocol/<name>/``:
``pretrain/`` -> for each evaluated checkpoint c (``last``, and ``epoch_<N>`` for every ``--snapshots`` N):
``linear/c``, ``knn/c``, ``semi1/c``, ``semi10/c`` (they read the pretraining checkpoint directly) and
``convert/c`` (``intl-convert --check`` to detectron2 weights) -> ``detection/c/seed<k>``; on Slurm a last
``report`` job. Each job has its own resources (the pretraining ``--nodes x --gpus``; the evaluations one node x
``--eval-gpus``; detection ``--detection-gpus``; the conversion and the report one CPU task) and starts when
what it needs exists: Slurm ``--dependency=afterok:<ids>`` (a job whose dependency failed is cancelled by
Slurm, ``--kill-on-invalid-dep=yes``), the report ``afterany``. A requeued (preempted, timed-out) job keeps
its id, so its dependants keep waiting for it. With ``--cluster local`` the same graph runs in order in this
process (in the foreground), a job whose input failed is skipped and the others go on.

The evaluations follow the pretraining's dataset (``configs/protocol/evals.yaml``); ``<eval>:key=value``
changes one (``linear``, ``knn``, ``semi1``, ``semi10``; ``semi``: both semi-supervised ones; ``eval``: every
classification one; ``detection:KEY=VALUE`` a detectron2 option). Submitting the same protocol again resumes
it: a complete job is reused, a queued or running one is waited for (never submitted twice), a failed one is
submitted again (it resumes from its own checkpoint); a complete job whose settings changed is refused.
Everything is checked before anything is queued. ``protocol.json`` keeps the graph; the report is
``slurm.protocol_report``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.atomic import check_writable, write_json
from common.checkpoint import LAST_NAME, SNAPSHOT_PATTERN
from common.config import config_dir, differences, flatten
from common.errors import UserError
from common.runlog import is_complete

from .errors import SubmitError
from .executor import (
    LOCAL,
    SLURM,
    Resources,
    check_against_partition,
    local_parameters,
    partition_info,
    render_sbatch,
    resolve_cluster,
    task_env,
    validate,
)
from .jobs import ConvertJob, DetectionJob, StageJob
from .protocol_report import (
    FAILED,
    LAST,
    PROTOCOL_FILE,
    ReportJob,
    job_states,
    local_driver,
    print_report,
    read_protocol,
)
from .runs import COMPLETE, NEW, SUBMITIT_DIR, RunState, active_jobs, record_submission, run_lock, run_state
from .stages import StageSpec, compose_stage_config, get_stage
from .submit import (
    Plan,
    _absolute,
    _attach,
    _check_cluster,
    _check_inputs,
    _import_stage_module,
    _plan_hydra,
    _preflight,
    _queue,
    _wait_or_report,
    add_resource_arguments,
)

EVALS = ("linear", "knn", "semi1", "semi10", "detection")
CLASSIFICATION = {"linear": "linear", "knn": "knn", "semi1": "semi", "semi10": "semi"}  # evaluation -> stage
GROUPS = {"eval": ("linear", "knn", "semi1", "semi10"), "semi": ("semi1", "semi10")}  # <target>: of overrides
OWNED = ("name", "run_dir", "weights")  # set by the protocol for every classification evaluation
DETECTION_OWNED = ("OUTPUT_DIR", "SEED", "MODEL.WEIGHTS")
EVALS_FILE = "protocol/evals.yaml"  # under configs/
SHORT_JOB_MIN = 60  # time limit of the conversion and report jobs

# Keys that do not change what a job computes (workers, logging, its own folder): a complete job submitted again
# with other values of them is reused. In the pretraining every train.* key is such a key (logging, checkpoints,
# snapshots, the monitor) except TRAIN_COMPUTES.
REUSE_NEUTRAL = ("name", "run_dir", "weights", "allow_unfinished", "data.workers", "train.log_every",
                 "knn.batch_size", "DATALOADER.NUM_WORKERS")
TRAIN_COMPUTES = ("train.max_steps", "train.amp", "train.on_nonfinite")
# ... and for the paper's reference column also the seed and where the data are.
REFERENCE_NEUTRAL = REUSE_NEUTRAL + ("seed", "data.root", "data.train_dir", "data.val_dir", "subset.list",
                                     "INTL.DATA_ROOT")

CONVERT = StageSpec("convert", "transfer.convert", function="convert", kind="convert")
REPORT = StageSpec("report", "slurm.protocol_report", function="write_report", kind="report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="submit protocol", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretraining, conversion and every evaluation of the paper as one job graph, and its table.",
        epilog="Overrides: pretraining key=value (as `submit pretrain`); <eval>:key=value for an evaluation "
               "(linear, knn, semi1, semi10, semi = both semi-supervised, eval = every classification one, "
               "detection:KEY=VALUE a detectron2 option). Put overrides that start with '-' after '--'.")
    p.add_argument("overrides", nargs="*", help="pretraining key=value; <eval>:key=value")
    add_resource_arguments(p)
    g = p.add_argument_group("protocol")
    g.add_argument("--name", help="protocol name: outputs/protocol/<name>/ (default: the pretraining's name)")
    g.add_argument("--evals", default=",".join(EVALS), help=f"evaluations to run (default {','.join(EVALS)})")
    g.add_argument("--snapshots", default="",
                   help="pretraining epochs whose snapshots are evaluated too, e.g. 100,200,400 (the run keeps "
                        "epoch_<N>.pth: train.keep_every_epochs)")
    g.add_argument("--snapshot-evals", help="evaluations of the snapshots (default: all of --evals)")
    g.add_argument("--eval-gpus", type=int, help="GPUs (processes) of each classification evaluation, on one node "
                                                 "(default: --gpus)")
    g.add_argument("--detection-gpus", type=int, help="GPUs of each detection seed, on one node (default: --eval-gpus)")
    g.add_argument("--detection-seeds", type=int, help="detection seeds (default: the dataset's, COCO 3)")
    g.add_argument("--eval-time", type=int, help="time limit of each evaluation job in minutes (default: --time)")
    g.add_argument("--dry-run", action="store_true", help="print the job graph and every sbatch script; submit nothing")
    g.add_argument("--wait", action="store_true",
                   help="block until every job ended, then print the table (--cluster local always waits)")
    v = p.add_argument_group("reading a protocol folder").add_mutually_exclusive_group()
    v.add_argument("--status", metavar="FOLDER", help="which jobs are pending, running, done, failed; their logs")
    v.add_argument("--report", metavar="FOLDER", help="write and print results.md / results.json again")
    return p


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.status:
            return print_status(Path(args.status))
        if args.report:
            return print_report(Path(args.report))
        for stage in ("pretrain", *sorted({CLASSIFICATION.get(e, e) for e in _names(args.evals, EVALS, "--evals")})):
            _import_stage_module(stage)  # from a shallow frame (see submit._import_stage_module)
        status = submit_protocol(args, "submit protocol " + shlex.join(argv))
        gc.collect()  # submitit's job objects clean up now, not during interpreter shutdown
        return status
    except UserError as e:
        print(f"submit protocol: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsubmit protocol: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------ the graph
@dataclass
class Node:
    """One job of the protocol: what it runs, where, with which resources, after which other jobs."""

    key: str                 # its run folder relative to the protocol folder: pretrain, linear/last, ...
    spec: StageSpec
    run_dir: Path
    job: Any                 # StageJob, DetectionJob, ConvertJob or ReportJob
    res: Resources
    deps: tuple[str, ...] = ()
    after: str = "afterok"
    evaluation: str | None = None
    checkpoint: str | None = None
    description: str = ""    # for --dry-run: the overrides / the command
    state: RunState = None   # NEW / RESUME / COMPLETE of its run folder at planning time

    def __post_init__(self):
        if self.state is None:
            self.state = run_state(self.run_dir)

    @property
    def config(self) -> dict:
        if isinstance(self.job, DetectionJob):  # the detectron2 options as keys, to compare them one by one
            return {"config_file": self.job.config_file, **dict(zip(self.job.opts[0::2], self.job.opts[1::2]))}
        return self.job.config

    def neutral_keys(self) -> list[str]:
        """REUSE_NEUTRAL, and for the pretraining its train.* keys but TRAIN_COMPUTES."""
        if self.spec.name != "pretrain":
            return list(REUSE_NEUTRAL)
        train = [k for k in flatten(self.config) if k.startswith("train.") and k not in TRAIN_COMPUTES]
        return [*REUSE_NEUTRAL, *train]

    def record(self) -> dict:
        return {"key": self.key, "stage": self.spec.name, "run_dir": str(self.run_dir), "deps": list(self.deps),
                "after": self.after, "eval": self.evaluation, "checkpoint": self.checkpoint, "config": self.config,
                "resources": {"nodes": self.res.nodes, "gpus": self.res.gpus, "time_min": self.res.time_min}}


@dataclass
class Protocol:
    name: str
    folder: Path
    cluster: str
    evals: list[str]
    snapshots: list[int]
    snapshot_evals: list[str]
    nodes: list[Node] = field(default_factory=list)
    reference: dict = field(default_factory=dict)
    setting: str = ""
    pretrain_yaml: str = ""

    @property
    def checkpoints(self) -> list[str]:
        return [f"epoch_{k}" for k in self.snapshots] + [LAST]

    def node(self, key: str) -> Node:
        return next(n for n in self.nodes if n.key == key)

    def record(self, command: str) -> dict:
        return {"name": self.name, "folder": str(self.folder), "command": command, "cwd": os.getcwd(),
                "cluster": self.cluster, "setting": self.setting, "evals": self.evals, "snapshots": self.snapshots,
                "snapshot_evals": self.snapshot_evals, "checkpoints": self.checkpoints, "reference": self.reference,
                "nodes": [n.record() for n in self.nodes]}


def _names(text: str | None, allowed: Sequence[str], option: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SubmitError(f"{option} {text!r}: unknown {', '.join(bad)}; fix: a comma-separated subset of "
                          f"{','.join(allowed)}")
    return [n for n in allowed if n in names]  # in the protocol's order, once each


def _epochs(text: str) -> list[int]:
    try:
        epochs = sorted({int(e) for e in text.split(",") if e.strip()})
    except ValueError:
        raise SubmitError(f"--snapshots {text!r}: give epochs as comma-separated integers, e.g. 100,200,400") from None
    if any(e < 1 for e in epochs):
        raise SubmitError(f"--snapshots {text!r}: epochs must be >= 1")
    return epochs


def split_overrides(overrides: Sequence[str], evals: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(pretraining overrides, {evaluation: its overrides}) from ``key=value`` and ``<target>:key=value``."""
    pretrain, per_eval, named = [], {e: [] for e in EVALS}, []
    for item in overrides:
        head, eq, _ = item.partition("=")
        target, colon, key = head.partition(":")
        if not colon or not eq:
            pretrain.append(item)
            continue
        targets = GROUPS.get(target, (target,) if target in EVALS else ())
        if not targets:
            raise SubmitError(f"override {item!r}: {target!r} is not an evaluation; fix: prefix with one of "
                              f"{', '.join((*EVALS, *GROUPS))} (e.g. linear:optim.epochs=90), or write a pretraining "
                              "override without a prefix")
        value = item.split("=", 1)[1]
        named += [target] if target in EVALS else []
        for t in targets:
            if t == "detection":
                if key in DETECTION_OWNED:
                    raise SubmitError(f"{key} is set by the protocol (its run folders, seeds and converted weights); "
                                      f"fix: drop {item!r}")
                per_eval[t] += [key, value]
            else:
                if key.lstrip("+~") in OWNED:
                    raise SubmitError(f"{key} is set by the protocol for every evaluation; fix: drop {item!r}")
                per_eval[t].append(f"{key}={value}")
    unused = [e for e in dict.fromkeys(named) if e not in evals]  # a group (eval:, semi:) may name evaluations not run
    if unused:
        print(f"submit protocol: note: --evals {','.join(evals)} leaves out {', '.join(unused)}: their overrides "
              "are not used")
    return pretrain, {e: o for e, o in per_eval.items() if e in evals}


def _preset(overrides: Sequence[str]) -> str | None:
    found = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("pretrain/preset=")]
    return found[-1] if found else None


def _container(stage: str, overrides: Sequence[str]) -> dict:
    cfg = compose_stage_config(stage, overrides)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise SubmitError(f"the {stage} config does not resolve: {e}; fix: check the overrides") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SubmitError(f"the {stage} config leaves {', '.join(missing)} without a value (???); fix: pass "
                          f"{missing[0]}=<value>")
    return container


def _select_setting(pretrain: dict) -> tuple[str, dict]:
    """The evaluations of configs/protocol/evals.yaml for this pretraining: its dataset (view preset), then
    the ``when`` changes whose condition holds."""
    table = OmegaConf.to_container(OmegaConf.load(config_dir() / EVALS_FILE), resolve=True)["datasets"]
    views = pretrain["data"]["augment"].get("preset")
    name = next((n for n, s in table.items() if views in s.get("views", ())), None)
    if name is None:
        known = ", ".join(f"{n} ({', '.join(s['views'])})" for n, s in table.items())
        raise SubmitError(f"the protocol has no evaluation settings for a pretraining on views {views!r} "
                          f"(configs/protocol/evals.yaml knows {known}); fix: evaluate this run with `submit linear "
                          "/ knn / semi / detection`, or add its dataset to configs/protocol/evals.yaml")
    setting = copy.deepcopy(table[name])
    flat = flatten(pretrain)
    for condition, changes in (setting.pop("when", None) or {}).items():
        key, _, value = condition.partition("=")
        if str(flat.get(key)).lower() == value.lower():
            setting.update(changes)
    return name, setting


def _snapshot_overrides(cfg: dict, snapshots: list[int]) -> list[str]:
    """The pretraining keys that keep ``epoch_<N>.pth`` for every requested N (train.keep_every_epochs)."""
    if not snapshots:
        return []
    t, epochs = cfg["train"], int(cfg["optim"]["epochs"])
    late = [e for e in snapshots if e >= epochs]
    if late:
        raise SubmitError(f"--snapshots {late} must be before the last epoch (optim.epochs={epochs}: the last is the "
                          "final checkpoint, always evaluated); fix: drop them")
    if t["keep_snapshots"]:
        raise SubmitError(f"--snapshots needs every snapshot kept, but train.keep_snapshots={t['keep_snapshots']} "
                          "deletes the older ones; fix: drop train.keep_snapshots")
    every = int(t["keep_every_epochs"]) or reduce(math.gcd, snapshots)
    if any(e % every for e in snapshots):
        raise SubmitError(f"train.keep_every_epochs={every} keeps no snapshot at epoch(s) "
                          f"{[e for e in snapshots if e % every]}; fix: drop train.keep_every_epochs (the protocol "
                          "then sets it)")
    return [f"train.keep_every_epochs={every}"]


def _reference(preset: str | None, pretrain: dict, per_eval: dict[str, list[str]]) -> dict:
    """Whether the paper's numbers of ``preset`` apply: the pretraining config is the preset's (neutral keys
    aside), and which evaluations run with settings of their own (those get no reference)."""
    own = {}
    for evaluation, overrides in per_eval.items():
        keys = overrides[0::2] if evaluation == "detection" else [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        changed = [k for k in keys if k not in REFERENCE_NEUTRAL]
        if changed:
            own[evaluation] = changed
    if preset is None:
        return {"preset": None, "why_not": "the pretraining names no preset (pretrain/preset=...)",
                "own_eval_settings": own}
    base = _container("pretrain", [f"pretrain/preset={preset}"])
    train_keys = {k for k in (*flatten(base), *flatten(pretrain)) if k.startswith("train.") and k not in TRAIN_COMPUTES}
    changed = differences(base, pretrain, ignore=[*REFERENCE_NEUTRAL, *train_keys])
    why = (f"the pretraining differs from the preset {preset!r} ({'; '.join(changed[:4])})" if changed else None)
    return {"preset": preset, "why_not": why, "own_eval_settings": own}


def plan(args) -> Protocol:
    """The protocol's job graph, every config composed and checked (nothing written, nothing queued)."""
    evals = _names(args.evals, EVALS, "--evals")
    if not evals:
        raise SubmitError("--evals is empty; fix: name at least one of " + ",".join(EVALS))
    snapshots = _epochs(args.snapshots)
    snapshot_evals = _names(args.snapshot_evals, evals, "--snapshot-evals") if args.snapshot_evals is not None \
        else list(evals)
    pre_overrides, per_eval = split_overrides(args.overrides, evals)
    cluster = resolve_cluster(args.cluster)
    eval_gpus = args.eval_gpus if args.eval_gpus is not None else args.gpus
    det_gpus = args.detection_gpus if args.detection_gpus is not None else eval_gpus

    first = _container("pretrain", pre_overrides)
    name = args.name or str(first["name"])
    if not name or "/" in name:
        raise SubmitError(f"--name {name!r} must be a plain folder name")
    folder = _absolute(str(Path("outputs") / "protocol" / name))
    protocol = Protocol(name, folder, cluster, evals, snapshots, snapshot_evals)

    common_res = dict(cluster=cluster, partition=args.partition, cpus_per_gpu=args.cpus_per_gpu, account=args.account,
                      qos=args.qos, constraint=args.constraint, env=task_env(args.env, args.collective_timeout))
    res = {
        "pretrain": Resources(nodes=args.nodes, gpus=args.gpus, time_min=args.time, mem_per_gpu=args.mem_per_gpu,
                              **common_res),
        "eval": Resources(nodes=1, gpus=eval_gpus, time_min=args.eval_time or args.time, mem_per_gpu=args.mem_per_gpu,
                          **common_res),
        "detection": Resources(nodes=1, gpus=det_gpus, time_min=args.eval_time or args.time,
                               mem_per_gpu=args.mem_per_gpu, **common_res),
        "cpu": Resources(nodes=1, gpus=0, time_min=min(SHORT_JOB_MIN, args.time), **common_res),
    }
    for key in ("pretrain", "eval", "detection"):
        validate(res[key])

    # the pretraining: `submit pretrain`'s own planning and checks, in the protocol's folder
    overrides = [*pre_overrides, *_snapshot_overrides(first, snapshots), f"run_dir={folder / 'pretrain'}"]
    pre_spec = get_stage("pretrain")
    pre_plan = _plan_hydra(pre_spec, argparse.Namespace(config_file=None, seeds=1, name=None, overrides=overrides,
                                                        new=False, nodes=args.nodes, gpus=args.gpus))
    pretrain = pre_plan.jobs[0].config
    protocol.pretrain_yaml = pre_plan.description
    job_name = f"intl-{name}"
    protocol.nodes.append(Node("pretrain", pre_spec, folder / "pretrain", pre_plan.jobs[0],
                               replace(res["pretrain"], job_name=f"{job_name}-pretrain"),
                               description=shlex.join(overrides), state=pre_plan.state))
    protocol.setting, setting = _select_setting(pretrain)
    protocol.reference = _reference(_preset(pre_overrides), pretrain, per_eval)
    arch = pretrain["model"]["arch"]
    if "detection" in evals and arch != "resnet50":
        raise SubmitError(f"detection (Mask R-CNN R50-C4) needs a ResNet-50 backbone, and this pretraining trains a "
                          f"{arch}; fix: pretrain/model=resnet50, or --evals without detection")
    data_root = str(_absolute(str(pretrain["data"]["root"])))

    composed: dict[str, dict] = {}  # evaluation -> its checked config (the checkpoints differ in OWNED keys only)
    if "detection" in evals:
        _check_detection(setting, per_eval["detection"], res["detection"])
    for ckpt in protocol.checkpoints:
        wanted = evals if ckpt == LAST else snapshot_evals
        source = folder / "pretrain" / (LAST_NAME if ckpt == LAST else SNAPSHOT_PATTERN.format(epoch=ckpt[6:]))
        if ckpt != LAST and pre_plan.state.state == COMPLETE and not source.is_file():
            raise SubmitError(f"the pretraining in {folder / 'pretrain'} is complete and kept no {source.name}; fix: "
                              "--snapshots with the epochs it kept (epoch_<N>.pth there), or a new --name")
        for evaluation in (e for e in wanted if e != "detection"):
            protocol.nodes.append(_plan_classification(
                evaluation, ckpt, source, setting, per_eval[evaluation], pretrain, data_root, protocol,
                replace(res["eval"], job_name=f"{job_name}-{evaluation}-{ckpt}"), composed))
        if "detection" in wanted:
            protocol.nodes += _plan_detection(ckpt, source, setting, per_eval["detection"], protocol, args,
                                              res["cpu"], replace(res["detection"], job_name=f"{job_name}-det-{ckpt}"))
    if cluster == SLURM:  # the report, once every other job ended (local: the driver writes it at the end)
        protocol.nodes.append(Node("report", REPORT, folder / "report", ReportJob(str(folder)),
                                   replace(res["cpu"], job_name=f"{job_name}-report"),
                                   deps=tuple(n.key for n in protocol.nodes), after="afterany",
                                   description="python -m slurm.protocol_report " + str(folder)))
    return protocol


def _plan_classification(evaluation: str, ckpt: str, source: Path, setting: dict, user: list[str], pretrain: dict,
                         data_root: str, protocol: Protocol, res: Resources, composed: dict[str, dict]) -> Node:
    stage = CLASSIFICATION[evaluation]
    spec = get_stage(stage)
    run_dir = protocol.folder / evaluation / ckpt
    own = {"name": f"{protocol.name}-{evaluation}-{ckpt}", "run_dir": str(run_dir), "weights": str(source)}
    overrides = [*setting[evaluation], f"data.root={data_root}", *user, *(f"{k}={v}" for k, v in own.items())]
    if evaluation not in composed:
        config = _container(stage, overrides)
        # Checked now as the stage will check it, except the weights, which the pretraining has not written yet.
        check = copy.deepcopy(config)
        check["weights"] = None
        check["model"]["arch"] = check["model"].get("arch") or pretrain["model"]["arch"]
        if check["model"].get("small_stem") is None:
            check["model"]["small_stem"] = pretrain["model"].get("small_stem")
        _preflight(spec, check, world_size=res.world_size)
        _check_inputs(spec, OmegaConf.create(check))
        composed[evaluation] = config
    config = {**copy.deepcopy(composed[evaluation]), **own}  # = _container(stage, overrides), composed once
    return Node(f"{evaluation}/{ckpt}", spec, run_dir, StageJob(spec, config), res, deps=("pretrain",),
                evaluation=evaluation, checkpoint=ckpt, description=shlex.join(overrides))


def _detection_opts(setting: dict, user: list[str]) -> tuple[Path, list[str]]:
    det = setting["detection"]
    return config_dir() / det["config_file"], [str(o) for o in det.get("opts", [])] + list(user)


def _check_detection(setting: dict, user: list[str], res: Resources) -> None:
    """detection's preflight (config, data, batch for the world size) without the weights, converted later."""
    config_file, opts = _detection_opts(setting, user)
    _preflight(get_stage("detection"), str(config_file), [*opts, "MODEL.WEIGHTS", ""], world_size=res.world_size)


def _plan_detection(ckpt: str, source: Path, setting: dict, user: list[str], protocol: Protocol, args,
                    cpu: Resources, res: Resources) -> list[Node]:
    from transfer.detection.aggregate import seed_runs  # detectron2: only when detection is evaluated

    config_file, opts = _detection_opts(setting, user)
    seeds = args.detection_seeds if args.detection_seeds is not None else int(setting["detection"].get("seeds", 1))
    if seeds < 1:
        raise SubmitError(f"--detection-seeds must be at least 1, got {seeds}")
    convert_dir = protocol.folder / "convert" / ckpt
    convert = ConvertJob(str(source), str(convert_dir))
    nodes = [Node(f"convert/{ckpt}", CONVERT, convert_dir, convert, replace(cpu, job_name=f"{res.job_name}-convert"),
                  deps=("pretrain",), checkpoint=ckpt,
                  description=f"intl-convert {source} {convert.output} --check")]
    spec = get_stage("detection")
    for out, extra in seed_runs(protocol.folder / "detection" / ckpt, seeds):
        job = DetectionJob(spec, str(config_file), [*opts, "MODEL.WEIGHTS", str(convert.output), *extra], str(out))
        nodes.append(Node(f"detection/{ckpt}/{out.name}", spec, out, job, res, deps=(f"convert/{ckpt}",),
                          evaluation="detection", checkpoint=ckpt,
                          description=f"python -m transfer.detection.train_net --config-file {config_file} --resume "
                                      + shlex.join([*job.opts, "OUTPUT_DIR", str(out)])))
    return nodes


# ------------------------------------------------------------------------------------------ submitting
def submit_protocol(args, command: str) -> int:
    protocol = plan(args)
    folder = protocol.folder
    checked = _check_cluster(protocol.node("pretrain").res, dry_run=args.dry_run)
    if checked and protocol.cluster == SLURM:
        info = partition_info(args.partition)
        for node in protocol.nodes:
            if node.res.gpus:
                check_against_partition(node.res, info)
    _check_unchanged(protocol)
    print(f"submit protocol: {protocol.name} in {folder} ({protocol.setting} evaluations, {protocol.cluster} "
          f"cluster): {len(protocol.nodes)} jobs")
    if args.dry_run:
        _print_dry_run(protocol, checked)
        return 0
    check_writable(folder, create=False)
    if protocol.cluster == LOCAL:
        if not args.wait:
            print("submit protocol: --cluster local runs the graph in this process, in order (as with --wait)")
        return _run_local(protocol, command)
    return _submit_slurm(protocol, command, args.wait)


def _check_unchanged(protocol: Protocol) -> None:
    """A complete job is reused only with the settings it ran with (protocol.json of the earlier submission)."""
    path = protocol.folder / PROTOCOL_FILE
    if not path.exists():
        return
    old = {n["key"]: n for n in read_protocol(protocol.folder)["nodes"]}
    for node in protocol.nodes:
        if node.key not in old or not is_complete(node.run_dir):
            continue
        changed = differences(old[node.key]["config"], node.config, ignore=node.neutral_keys())
        if changed:
            raise SubmitError(f"{node.key} is complete in {protocol.folder} with other settings "
                              f"({'; '.join(changed[:6])}); nothing was submitted; fix: --name <new name> for a "
                              f"separate protocol, or delete {node.run_dir} to redo that job with the new settings")


def _dependency(node: Node, job_ids: dict[str, str]) -> str | None:
    ids = [job_ids[d] for d in node.deps if d in job_ids]
    return f"{node.after}:{':'.join(ids)}" if ids else None


def _graph_lines(protocol: Protocol, job_ids: dict[str, str], reused: set[str]) -> list[str]:
    """One line per job: key, state (or job id), resources, what it waits for."""
    lines = []
    for node in protocol.nodes:
        res = node.res
        where = f"{res.nodes} node x {res.gpus} GPU" if res.gpus else "1 CPU task"
        state = ("complete: reused" if node.key in reused else
                 f"job {job_ids[node.key]}" if node.key in job_ids else node.state.state)
        deps = "every other job" if node.key == "report" else ", ".join(node.deps)
        lines.append(f"  {node.key:<28} {state:<18} {where:<16} " + (f"{node.after}: {deps}" if deps else ""))
    return lines


def _print_dry_run(protocol: Protocol, checked: bool) -> None:
    print("submit protocol: the job graph (state of each run folder, resources, what it waits for):")
    print("\n".join(_graph_lines(protocol, {}, {n.key for n in protocol.nodes if n.state.state == COMPLETE})))
    print("submit protocol: the pretraining's resolved config:")
    print(protocol.pretrain_yaml, end="")
    placeholders = {n.key: f"@{n.key}" for n in protocol.nodes if n.state.state != COMPLETE}
    for node in protocol.nodes:
        print(f"\n--- {node.key} ({node.spec.name}) in {node.run_dir}: {node.description}")
        if node.state.state == COMPLETE:
            print("complete: reused, not submitted")
        elif protocol.cluster == SLURM:
            print(render_sbatch(replace(node.res, dependency=_dependency(node, placeholders)),
                  node.run_dir / SUBMITIT_DIR), end="")
        else:
            print(f"local processes: {local_parameters(node.res)}")
    if not checked:
        print("submit protocol: note: no Slurm controller answers here, so partition limits were not checked")
    print("submit protocol: dry run: nothing was submitted and nothing was written (@<job> in a --dependency "
          "stands for that job's id)")


def _queue_node(node: Node, res: Resources, command: str):
    """Submits one job of the graph as `submit <stage>` would (config.yaml of a new run, submitit folder,
    submissions.jsonl); returns the submitit job."""
    plan = Plan(node.spec, node.state if node.state.state != COMPLETE else RunState(node.run_dir, NEW), [node.job],
                node.description, [str(node.run_dir)])
    _, jobs = _queue(plan, res, node.run_dir, shlex.split(command)[1:])
    return jobs[0]


def _submit_slurm(protocol: Protocol, command: str, wait: bool) -> int:
    folder = protocol.folder
    job_ids: dict[str, str] = {}   # every job of the graph that is queued or running now
    handles, submitted, attached, reused = [], [], [], set()
    with run_lock(folder):
        local = [n.key for n in protocol.nodes if any(a.record.get("cluster") == LOCAL for a in active_jobs(n.run_dir))]
        driver = local_driver(folder)
        if driver or local:
            raise SubmitError(f"this protocol is being run by `submit protocol --cluster local` "
                              f"({driver or 'local jobs ' + ', '.join(local)}); nothing was submitted; fix: wait for "
                              "it, or stop it with Ctrl-C / kill -INT")
        write_json(folder / PROTOCOL_FILE, protocol.record(command))
        for node in protocol.nodes:
            if node.key != "report" and is_complete(node.run_dir):
                reused.add(node.key)
                continue
            with run_lock(node.run_dir):
                active = active_jobs(node.run_dir)
                if active and (node.key != "report" or not submitted):  # a new job needs a new report after it
                    job_ids[node.key] = active[-1].job_id
                    handles += [_attach(a, node.run_dir) for a in active]
                    attached.append(node.key)
                    continue
                if node.key == "report" and not submitted:
                    continue  # nothing queued: the table is written below
                job = _queue_node(node, replace(node.res, dependency=_dependency(node, job_ids)), command)
            job_ids[node.key] = str(job.job_id)
            handles.append(job)
            submitted.append(node.key)
        record_submission(folder, {"stage": "protocol", "cluster": SLURM, "host": socket.gethostname(),
                                   "job_ids": [], "jobs": job_ids, "submitted": submitted, "attached": attached,
                                   "reused": sorted(reused), "command": command, "cwd": os.getcwd()})
    print("\n".join(_graph_lines(protocol, job_ids, reused)))
    if attached:
        print(f"submit protocol: already queued or running, not submitted again: {', '.join(attached)}")
    print(f"submit protocol: {len(submitted)} job(s) submitted, {len(attached)} waited for, {len(reused)} complete "
          "and reused")
    if not handles:
        return print_report(folder)
    if not wait:
        print(f"submit protocol: follow with `submit protocol --status {folder}`; the table is written to "
              f"{folder / 'results.md'} when every job ended (any time: `submit protocol --report {folder}`); "
              f"stop with `scancel {' '.join(job_ids.values())}`")
        return 0
    status = _wait_or_report(handles, command)  # the same command resumes the protocol
    if status == 130:
        return status
    return max(status, print_report(folder))


def _run_local(protocol: Protocol, command: str) -> int:
    """The graph in order, one job at a time, in this process; a job whose input failed is not run."""
    folder = protocol.folder
    with run_lock(folder):
        driver = local_driver(folder)
        running = [n.key for n in protocol.nodes if active_jobs(n.run_dir)]
        if driver or running:
            raise SubmitError(f"this protocol already runs ({driver or 'jobs ' + ', '.join(running)}); nothing was "
                              "started; fix: wait for it (submit protocol --status), or stop it first")
        write_json(folder / PROTOCOL_FILE, protocol.record(command))
        record_submission(folder, {"stage": "protocol", "cluster": LOCAL, "host": socket.gethostname(),
                                   "job_ids": [os.getpid()], "command": command, "cwd": os.getcwd()})
    print("\n".join(_graph_lines(protocol, {}, {n.key for n in protocol.nodes if is_complete(n.run_dir)})))
    broken: set[str] = set()
    for number, node in enumerate(protocol.nodes, 1):
        head = f"submit protocol: [{number}/{len(protocol.nodes)}] {node.key}"
        if is_complete(node.run_dir):
            print(f"{head}: complete, reused")
            continue
        blocked = [d for d in node.deps if d in broken]
        if blocked:
            print(f"{head}: not run, {', '.join(blocked)} failed")
            broken.add(node.key)
            continue
        node.state = run_state(node.run_dir)
        print(f"{head}: {node.state.describe()}", flush=True)
        with run_lock(node.run_dir):
            job = _queue_node(node, node.res, command)
        print(f"{head}: local job {job.job_id}, logs {job.paths.stdout} | {job.paths.stderr}", flush=True)
        status = _wait_or_report([job], command)
        if status == 130:
            return status
        if not is_complete(node.run_dir):
            broken.add(node.key)
            print(f"{head}: FAILED; the other jobs go on (logs: {job.paths.stderr})", flush=True)
    return print_report(folder)


# ------------------------------------------------------------------------------------------ reading
def print_status(folder: Path) -> int:
    """`--status`: every job with its state, job id and logs; exit 1 when one failed."""
    protocol = read_protocol(folder)
    states = job_states(folder, protocol)
    counts = {s: sum(j.state == s for j in states) for s in dict.fromkeys(j.state for j in states)}
    print(f"protocol {protocol['name']} ({folder}): {len(states)} jobs: "
          + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for state in states:
        print(state.line())
    active = active_jobs(folder / "report")
    table = folder / "results.md"
    if active:
        print(f"  the report job {active[-1].job_id} ({active[-1].state}) writes {table} when every job ended")
    print(f"  table: {table}" + ("" if table.exists() else " (not written yet)")
          + f"; `submit protocol --report {folder}` writes it now")
    return 1 if any(s.state == FAILED for s in states) else 0



if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
