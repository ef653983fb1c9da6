"""The start and the end every Hydra stage (pretrain, linear, semi, knn) shares.

``begin(cfg, validate, log)``: console logging, the process group from the launcher's environment, the
config checked against the stage's schema, the CPU cores shared between the processes of one job, and
the results of a run that is already complete, else the run folder checked writable and this attempt's
provenance appended to ``provenance.json`` (rank 0; common/provenance.py).
``hydra_main(stage, run)``: ``python -m <module> key=value ...``; an unwritable run folder (checked before
Hydra writes into it) or a ``UserError`` prints one line and exits 2, anything else keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from common.atomic import check_writable, jsonable
from common.config import compose_config, config_dir
from common.distributed import DistInfo, cpu_threads_per_process, init_distributed
from common.errors import ConfigError, UserError
from common.provenance import record_attempt
from common.runlog import is_complete, previous_results


def ensure_logging(log: logging.Logger) -> None:
    """A console handler for ``log`` when nobody (Hydra, the launcher) configured one."""
    if logging.getLogger().handlers or log.handlers:
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@dataclass
class Start:
    cfg: DictConfig           # validated, resolved
    info: DistInfo
    run_dir: Path
    done: dict | None         # the results of an already complete run (every rank), else None

    def finished_result(self) -> dict | None:
        """What ``run`` returns for an already complete run: its results on rank 0, None elsewhere."""
        return self.done if self.info.is_main else None


def begin(cfg: Any, validate: Callable[..., DictConfig], log: logging.Logger,
          check_done: Callable[[DictConfig, dict, Path], None] | None = None) -> Start:
    """The first thing every Hydra stage's ``run(cfg)`` does (see the module docstring).

    check_done(cfg, previous results, run_dir): called for a complete run before it is reported as such;
    raises a ``UserError`` when those results are not what ``cfg`` asks for (other weights, another config).
    """
    ensure_logging(log)
    info = init_distributed()
    cfg = validate(cfg, world_size=info.world_size)
    cpu_threads_per_process(info)
    run_dir = Path(cfg.run_dir)
    done = None
    if is_complete(run_dir):
        previous = previous_results(run_dir)
        if check_done is not None:
            check_done(cfg, previous, run_dir)
        done = {**previous, "already_complete": True}
        headline = f"top-1 {done['top1']}" if "top1" in done else f"step {done.get('steps')}"
        log.info("run %s is already complete (%s); nothing to do", run_dir, headline)
    elif info.is_main:
        check_writable(run_dir)  # a read-only run folder fails now, not at the first checkpoint
        record_attempt(run_dir, info.world_size)
    return Start(cfg, info, run_dir, done)


def check_run_dir_before_hydra(stage: str, argv: list[str]) -> None:
    """Hydra creates ``hydra.run.dir`` (= ``run_dir``) and writes its logs there before ``run`` starts, and
    reports a folder it cannot write as a traceback; this checks it first: a ``WriteError`` (a UserError).

    Only for plain ``key=value`` arguments (Hydra's own flags and ``hydra.*`` settings are Hydra's to report).
    """
    if any(a.startswith("-") or "=" not in a or a.lstrip("+~").startswith("hydra.") for a in argv):
        return
    try:
        run_dir = Path(compose_config(stage, argv).run_dir)
    except ConfigError:
        return  # Hydra's main reports overrides that do not compose, in its own words
    if not is_complete(run_dir):
        check_writable(run_dir)


def hydra_main(stage: str, run: Callable[[DictConfig], Any]) -> None:
    """``python -m <stage module> key=value ...`` on ``configs/<stage>.yaml``; prints the results as JSON."""
    import hydra

    try:
        check_run_dir_before_hydra(stage, sys.argv[1:])
    except UserError as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path=str(config_dir()), config_name=stage, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        try:
            results = run(cfg)
        except UserError as e:
            print(f"{stage}: error: {e}", file=sys.stderr)
            sys.exit(2)
        if results is not None:
            print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2, default=jsonable))

    main()
