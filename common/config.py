"""Where the configs live, how a stage config is composed, and how it is checked against its schema.

``config_dir()`` is the one place that finds the repository's ``configs/`` folder; ``compose_config(stage,
overrides)`` the one place that composes a stage config outside a Hydra main (the launcher, the tests,
the demo and the toy labs call it); ``merge_onto_schema`` the one place that merges a composed config
onto a stage's dataclass schema (unknown keys and wrong types rejected with the valid keys named).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError

CONFIG_DIR_ENV = "INTL_CONFIGS"


def config_dir() -> Path:
    """The folder holding the configs.

    Order: ``$INTL_CONFIGS``, ``configs/`` next to this package (a source checkout, an editable install,
    or an install shipping the YAML as package data), ``<prefix>/share/intl-pipeline/configs``
    (data-files install). Never the current directory.
    """
    candidates = []
    if os.environ.get(CONFIG_DIR_ENV):
        candidates.append(Path(os.environ[CONFIG_DIR_ENV]))
    candidates.append(Path(__file__).resolve().parents[1] / "configs")
    candidates.append(Path(sys.prefix) / "share" / "intl-pipeline" / "configs")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise ConfigError("cannot find the configs/ folder (looked in: " + ", ".join(map(str, candidates)) +
                      f"); fix: run from a checkout of the repository or set {CONFIG_DIR_ENV}=/path/to/configs")


def compose_config(stage: str, overrides: Sequence[str] = (), directory: str | os.PathLike | None = None,
                   config_name: str | None = None) -> DictConfig:
    """Composes ``<directory>/<config_name>.yaml`` (default: ``config_dir()/<stage>.yaml``) with Hydra
    ``key=value`` overrides and returns the DictConfig.

    Raises ConfigError when the config is missing or the overrides do not compose. Works inside a running
    Hydra app too (its global state is saved and restored).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    cdir = Path(directory) if directory is not None else config_dir()
    name = config_name or stage
    if not (cdir / f"{name}.yaml").is_file():
        raise ConfigError(f"stage {stage!r} has no config {cdir / (name + '.yaml')}; "
                          f"fix: add the config (or set {CONFIG_DIR_ENV} to the folder holding it)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be Hydra key=value pairs, got {bad}; fix: write e.g. optim.lr=0.1")
    outer = get_gh_backup() if GlobalHydra.instance().is_initialized() else None
    if outer is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cdir), job_name=f"compose_{stage}", version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"the {stage} config does not compose with overrides {list(overrides)}: "
                          f"{str(e).strip()}; fix: check the key names and values against "
                          f"{cdir / (name + '.yaml')}") from None
    finally:
        if outer is not None:
            restore_gh_from_backup(outer)


def merge_onto_schema(cfg: Any, schema: type, what: str, error: type[ConfigError] = ConfigError) -> DictConfig:
    """``cfg`` (a DictConfig or a plain dict; a ``hydra`` key is dropped) merged onto the structured
    ``schema`` dataclass and resolved. An unknown key, a wrong type or a bad interpolation raises
    ``error`` (a ConfigError) naming the key (``bad <what> config at 'optim.lr': ...``) and the valid keys
    there."""
    raw = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    if "hydra" in raw:
        raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"])
    structured = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(structured, raw)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        section = key.split(".")[0] if "." in key else ""
        if section in structured and OmegaConf.is_config(structured[section]):
            valid = f"; valid keys of {section}: {sorted(structured[section].keys())}"
        else:
            valid = f"; valid top-level keys: {sorted(structured.keys())}"
        first_line = (str(getattr(e, "msg", e)).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"bad {what} config at {key or '<root>'!r}: {first_line}{valid}") from None
    return merged


def to_plain(cfg: Any) -> dict:
    """A resolved DictConfig as plain Python containers (results.json, checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def flatten(d: Any, prefix: str = "") -> dict:
    """A nested plain dict as ``{"a.b.c": value}`` (lists are values): what config comparisons read."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def differences(old: dict, new: dict, ignore: Sequence[str] = ()) -> list[str]:
    """``"key: old -> new"`` for every flattened key whose value differs between two plain configs, except
    the keys in ``ignore`` (sorted by key)."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in ignore]
