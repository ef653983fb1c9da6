"""``submit doctor --nodes N --gpus G [data.root=...]``: checks a multi-process set-up before a long run.

A stage like the others (``run(cfg)`` in every task, ``configs/doctor.yaml``, a run folder
``outputs/doctor/doctor_<time>/``), so it runs through the same launcher, on Slurm or local processes, with the
same ``--env`` and ``--collective-timeout``. Every task:

- says who it is: host, rank, local rank, device (and ``CUDA_VISIBLE_DEVICES``), the address its host name
  resolves to (the one gloo and NCCL advertise), the ``NCCL_*`` / ``GLOO_*`` settings it sees;
- takes part in an ``all_reduce`` of known values (rank r sends ``arange(n) * (r + 1)``; the sum must be
  ``arange(n) * W (W + 1) / 2`` exactly) and an ``all_gather`` (rank r sends ``(r, local rank)``), and times an
  ``all_reduce`` of ``collective_mb`` MB;
- lists and reads ``data.files`` files under ``data.root`` (when set), as the data loaders will;
- finds the run folder, reads the token rank 0 wrote there (the same shared folder, not a node's own copy)
  and measures its free disk.

Rank 0 gathers the rows, prints one table, and writes it to ``doctor.md`` (and everything to ``doctor.json``;
``results.json`` and ``COMPLETE`` when every check passed). A failed check fails the job (``submit --wait``
exits 1) with ``DoctorError`` naming each problem; ranks that never meet fail at the rendezvous after the
collective timeout (``--collective-timeout``), naming no table.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import MISSING, DictConfig

from common.atomic import atomic_write_text, write_json
from common.config import merge_onto_schema
from common.distributed import barrier, collective_timeout_min, is_dist
from common.errors import ConfigError, UserError
from common.runlog import mark_complete, write_results
from common.stage import begin, hydra_main

log = logging.getLogger("doctor")

TOKEN_NAME = ".doctor_token"
ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_")


class DoctorError(UserError, RuntimeError):
    """At least one check failed; the message names each problem (the table is in the run folder)."""


@dataclass
class DataSchema:
    root: Optional[str] = MISSING
    files: int = MISSING


@dataclass
class DiskSchema:
    min_free_gb: float = MISSING


@dataclass
class DoctorSchema:
    name: str = MISSING
    run_dir: str = MISSING
    seed: int = MISSING
    data: DataSchema = field(default_factory=DataSchema)
    disk: DiskSchema = field(default_factory=DiskSchema)
    collective_mb: float = MISSING


def validate_config(cfg: Any, world_size: int = 1) -> DictConfig:
    merged = merge_onto_schema(cfg, DoctorSchema, "doctor")
    if merged.data.files < 1:
        raise ConfigError(f"data.files must be >= 1, got {merged.data.files}")
    if merged.data.root is not None and not Path(merged.data.root).is_dir():
        raise ConfigError(f"data.root={merged.data.root} is not a folder here; fix: data.root=<the dataset folder "
                          "the nodes read>, or data.root=null to skip that check")
    if not merged.collective_mb > 0 or merged.disk.min_free_gb < 0:
        raise ConfigError("collective_mb must be > 0 and disk.min_free_gb >= 0")
    return merged


# ------------------------------------------------------------------------------------- this task
def identity(info) -> dict:
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError as e:
        address = f"unresolvable ({e})"
    device = str(info.device)
    if info.device.type == "cuda":
        device += f" {torch.cuda.get_device_name(info.device)}"
    return {"rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)), "host": host,
            "address": address, "device": device, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(), "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}}


def read_data(root: str | None, files: int) -> dict:
    """Lists and reads (in full) the first ``files`` files under ``root`` in sorted order."""
    if root is None:
        return {"checked": False}
    n, size = 0, 0
    try:
        if not Path(root).is_dir():
            return {"checked": True, "ok": False, "error": f"{root} is not a folder on this node"}
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames.sort()
            for name in sorted(filenames):
                with open(os.path.join(dirpath, name), "rb") as f:
                    while chunk := f.read(1 << 20):
                        size += len(chunk)
                n += 1
                if n >= files:
                    return {"checked": True, "ok": True, "files": n, "bytes": size}
    except OSError as e:
        return {"checked": True, "ok": False, "error": f"{type(e).__name__}: {e}", "files": n}
    return {"checked": True, "ok": n > 0, "files": n, "bytes": size,
            **({} if n else {"error": f"no file under {root}"})}


def _raise(e: OSError) -> None:
    raise e


def check_collectives(info, collective_mb: float) -> dict:
    """all_reduce and all_gather of known values (exact), and the time of a ``collective_mb`` MB all_reduce."""
    if not is_dist():
        return {"all_reduce": None, "all_gather": None}
    world, device = info.world_size, info.device
    n = 1000
    x = torch.arange(n, dtype=torch.float64, device=device) * (info.rank + 1)
    dist.all_reduce(x)
    expected = torch.arange(n, dtype=torch.float64, device=device) * (world * (world + 1) / 2)
    reduce_ok = bool(torch.equal(x, expected))
    mine = torch.tensor([info.rank, info.local_rank], dtype=torch.float32, device=device)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    gather_ok = [int(t[0].item()) for t in out] == list(range(world))
    big = torch.ones(max(1, int(collective_mb * 2**20 / 4)), dtype=torch.float32, device=device)
    barrier()
    t0 = time.perf_counter()
    dist.all_reduce(big)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1000
    return {"all_reduce": reduce_ok, "all_gather": gather_ok, "all_reduce_ms": ms,
            "big_ok": bool(big[0].item() == world), "gathered_local_ranks": [int(t[1].item()) for t in out]}


def check_run_folder(run_dir: Path, token: str) -> dict:
    try:
        seen = (run_dir / TOKEN_NAME).read_text()
        free = shutil.disk_usage(run_dir).free / 2**30
    except OSError as e:
        return {"shared": False, "error": f"{type(e).__name__}: {e}"}
    return {"shared": seen == token, "free_gb": free,
            **({} if seen == token else {"error": f"{run_dir / TOKEN_NAME} holds another token: not the folder "
                                                  "rank 0 wrote to (a node-local folder of the same name?)"})}


# ------------------------------------------------------------------------------------- the verdict
def problems(rows: list[dict], world_size: int, min_free_gb: float, nodes: int | None = None) -> list[str]:
    """What is wrong in the gathered rows (empty: every check passed). ``nodes``: hosts expected."""
    found = []
    ranks = sorted(r["rank"] for r in rows)
    if ranks != list(range(world_size)):
        found.append(f"ranks {ranks} met, expected 0..{world_size - 1}")
    hosts: dict[str, list[dict]] = {}
    for r in rows:
        hosts.setdefault(r["host"], []).append(r)
    if nodes is not None and len(hosts) != nodes:
        found.append(f"{len(hosts)} host name(s) ({', '.join(sorted(hosts))}) for {nodes} node(s): nodes sharing a "
                     "host name cannot be told apart (MASTER_ADDR, local ranks)")
    for host, rs in sorted(hosts.items()):
        local = sorted(r["local_rank"] for r in rs)
        if local != list(range(len(rs))) or any(r["local_world_size"] != len(rs) for r in rs):
            found.append(f"host {host}: local ranks {local} with LOCAL_WORLD_SIZE "
                         f"{sorted({r['local_world_size'] for r in rs})} for its {len(rs)} rank(s)")
        gpus = [r["device"] for r in rs if r["device"].startswith("cuda")]
        if len(gpus) != len(set(gpus)):
            found.append(f"host {host}: several ranks on one GPU ({', '.join(gpus)})")
    each: list[tuple[int, str, str]] = []  # (rank, host, what is wrong there): grouped by host and problem below
    if len(hosts) > 1:
        for r in rows:
            if r["address"].startswith(("127.", "unresolvable")):
                each.append((r["rank"], r["host"], f"the host name resolves to {r['address']}, which the other nodes "
                             "cannot reach; fix: /etc/hosts, or --env GLOO_SOCKET_IFNAME=<if> / "
                             "--env NCCL_SOCKET_IFNAME=<if>"))
    for r in rows:
        c, d, f = r["collectives"], r["data"], r["run_folder"]
        for key in ("all_reduce", "all_gather"):
            if c.get(key) is False:
                each.append((r["rank"], r["host"], f"{key} of known values gave a wrong result"))
        if c.get("big_ok") is False:
            each.append((r["rank"], r["host"], "the timed all_reduce gave a wrong result"))
        if d.get("checked") and not d.get("ok"):
            each.append((r["rank"], r["host"], f"data.root unreadable: {d.get('error')}"))
        if not f.get("shared"):
            each.append((r["rank"], r["host"], f"run folder: {f.get('error')}"))
        elif f["free_gb"] < min_free_gb:
            each.append((r["rank"], r["host"], f"{f['free_gb']:.1f} GB free in the run folder's filesystem, less "
                                               f"than disk.min_free_gb={min_free_gb:g}"))
    grouped: dict[tuple[str, str], list[int]] = {}
    for rank, host, what in each:
        grouped.setdefault((host, what), []).append(rank)
    for (host, what), ranks_there in grouped.items():
        found.append(f"rank{'s' if len(ranks_there) > 1 else ''} {', '.join(map(str, sorted(ranks_there)))} "
                     f"({host}): {what}")
    return found


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _ok(value: bool | None) -> str:
    return "-" if value is None else ("ok" if value else "WRONG")


def table(rows: list[dict]) -> str:
    """The markdown table, one row per rank."""
    head = ("| rank | host | local rank | device | address | all_reduce | all_gather | data.root | free disk | "
            "run folder | NCCL/GLOO env |\n|---:|---|---:|---|---|---|---|---|---:|---|---|\n")
    lines = []
    for r in sorted(rows, key=lambda r: r["rank"]):
        c, d, f = r["collectives"], r["data"], r["run_folder"]
        reduce = _ok(c.get("all_reduce")) + (f" ({c['all_reduce_ms']:.1f} ms)" if "all_reduce_ms" in c else "")
        data = "-" if not d.get("checked") else (f"{d['files']} files, {_size(d['bytes'])}" if d.get("ok")
                                                 else f"FAILED: {d.get('error')}")
        folder = "shared" if f.get("shared") else f"FAILED: {f.get('error')}"
        free = f"{f['free_gb']:.1f} GB" if "free_gb" in f else "-"
        env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "-"
        lines.append(f"| {r['rank']} | {r['host']} | {r['local_rank']}/{r['local_world_size']} | {r['device']} | "
                     f"{r['address']} | {reduce} | {_ok(c.get('all_gather'))} | {data} | {free} | {folder} | {env} |")
    return head + "\n".join(lines) + "\n"


def _nodes_expected() -> int | None:
    value = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    return int(value) if value and value.isdigit() else None


# ------------------------------------------------------------------------------------- the stage
def run(cfg: DictConfig) -> dict | None:
    start = begin(cfg, validate_config, log)
    info, run_dir, cfg = start.info, start.run_dir, start.cfg
    if start.done is not None:
        return start.finished_result()
    token = uuid.uuid4().hex if info.is_main else None
    if info.is_main:
        atomic_write_text(run_dir / TOKEN_NAME, token)
    if is_dist():
        box = [token]
        dist.broadcast_object_list(box, src=0)
        token = box[0]
    row = identity(info)
    row["collectives"] = check_collectives(info, float(cfg.collective_mb))
    row["data"] = read_data(cfg.data.root, int(cfg.data.files))
    row["run_folder"] = check_run_folder(run_dir, token)
    rows = [row]
    if is_dist():
        rows = [None] * info.world_size
        dist.all_gather_object(rows, row)
    found = problems(rows, info.world_size, float(cfg.disk.min_free_gb), _nodes_expected())
    hosts = sorted({r["host"] for r in rows})
    summary = {"ok": not found, "problems": found, "world_size": info.world_size, "hosts": hosts,
               "backend": info.backend, "collective_timeout_min": collective_timeout_min(),
               "all_reduce_ms": max((r["collectives"].get("all_reduce_ms", 0.0) for r in rows), default=0.0),
               "collective_mb": float(cfg.collective_mb)}
    text = table(rows)
    verdict = ("every check passed" if not found else f"{len(found)} problem(s):\n" +
               "\n".join(f"- {p}" for p in found))
    header = (f"doctor: {info.world_size} rank(s) on {len(hosts)} host(s), backend {info.backend or 'none'}, "
              f"collective timeout {summary['collective_timeout_min']:g} min, all_reduce of "
              f"{summary['collective_mb']:g} MB in {summary['all_reduce_ms']:.1f} ms (slowest rank)")
    if info.is_main:
        atomic_write_text(run_dir / "doctor.md", f"{header}\n\n{text}\n{verdict}\n")
        write_json(run_dir / "doctor.json", {**summary, "rows": rows})
        (run_dir / TOKEN_NAME).unlink(missing_ok=True)
        print(f"{header}\n{text}{verdict}\ntable: {run_dir / 'doctor.md'}", flush=True)
        if not found:
            mark_complete(run_dir, write_results(run_dir, summary))
    barrier()
    if found:
        raise DoctorError(f"{len(found)} check(s) failed: {'; '.join(found)} (table: {run_dir / 'doctor.md'})")
    return summary if info.is_main else None


if __name__ == "__main__":
    hydra_main("doctor", run)
