"""Planning experiment runs: ``-p`` arguments and grid files, their combinations, run ids and the runs' configs.

A run's id is readable (``head=linear_tune=false``) and ends in a short hash of
the resolved settings (paths and secrets excluded, :func:`settings_hash`), so a
run never overwrites another and an identical run is found again.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from vslib import report
from vslib.config import Config, ConfigError, apply_overrides, parse_value
from vslib.redact import SECRET_KEYS, is_marker, redact_text, strip_userinfo

COMPARE_NOTEBOOK = "06_compare_runs.ipynb"
#: ``-p notebook.NAME=value`` sets the notebooks' own parameter NAME
NOTEBOOK_PREFIX = "notebook."
#: notebook parameters every run derives from its config (set them through the config's keys)
FROM_CONFIG = {"config_path": "", "dataset": "dataset.name", "backbone": "backbone.name", "backend": "index.backend",
               "max_per_class": "dataset.max_per_class", "max_queries": "evaluation.max_queries",
               "data_dir": "", "models_dir": "", "reports_dir": ""}


def parse_param(text: str) -> tuple[str, list]:
    """``"section.key=v1,v2"`` -> ``("section.key", [v1, v2])``, each value read as YAML.

    A value starting with ``[`` or ``{`` is one value (``evaluation.ks=[1,5,10]``);
    to grid over lists, use a grid file.
    """
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-p {text!r}: write section.key=value (e.g. -p search.mass=0.8, "
                          "or -p classifier.head=linear,knn for a grid)")
    raw = raw.strip()
    if raw.startswith(("[", "{")):
        return key, [parse_value(raw)]
    parts = [p.strip() for p in raw.split(",")]
    if any(p == "" for p in parts) and len(parts) > 1:
        raise ConfigError(f"-p {text!r}: an empty value in the list; separate values with single commas")
    return key, [parse_value(p) for p in parts]


def load_grid_file(path: str | os.PathLike) -> dict[str, list]:
    """A YAML grid file: ``{section.key: value or [values]}``, optionally under a top-level ``parameters:``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grid file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if isinstance(data, dict) and set(data) == {"parameters"}:
        data = data["parameters"] or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of section.key: [values], e.g. 'classifier.head: [linear, knn]'")
    grid = {}
    for key, values in data.items():
        if isinstance(values, dict):
            raise ConfigError(f"{p}: {key} holds a mapping; write dotted names (e.g. 'search.mass: [0.8, 0.9]')")
        grid[str(key)] = list(values) if isinstance(values, list) else [values]
        if not grid[str(key)]:
            raise ConfigError(f"{p}: {key} has an empty list of values")
    return grid


def grid_from(params: Sequence[str] = (), grid_file: Optional[str | os.PathLike] = None) -> dict[str, list]:
    """The grid of a grid file and ``-p`` arguments (a ``-p`` replaces the file's values of its key)."""
    grid = load_grid_file(grid_file) if grid_file else {}
    for text in params:
        key, values = parse_param(text)
        grid[key] = values
    for key in grid:
        if key == "paths" or key.startswith("paths."):
            raise ConfigError(f"-p {key}: paths are set per run by the experiment (reports/runs/<run-id>/, shared "
                              "caches); set paths in the base config instead")
    return grid


def combinations(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in the order the keys were given."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def settings_hash(cfg: Config) -> str:
    """Short hash of everything a run depends on in ``cfg`` (paths excluded)."""
    return short_hash(hashed_settings(cfg))


def hashed_settings(cfg: Config) -> dict:
    """``cfg.to_dict()`` without paths, with the files it names made absolute."""
    d = cfg.to_dict()
    d.pop("paths")
    # secrets are not settings: a run is the same run whether its password came from the file or VS_ES_PASSWORD
    es = d["index"]["elasticsearch"]
    for key in SECRET_KEYS:
        if key != "ca_certs" or is_marker(es.get(key)):
            es.pop(key, None)
    es["hosts"] = [strip_userinfo(h) for h in es.get("hosts") or []]
    # files named by the config count by where they are, however the path was written
    if cfg.dataset.root:
        d["dataset"]["root"] = str(cfg.path(cfg.dataset.root).resolve())
    if cfg.backbone.weights and cfg.backbone.weights != "imagenet":
        d["backbone"]["weights"] = str(cfg.path(cfg.backbone.weights).resolve())
    return d


def run_hash(cfg: Config, notebook_parameters: Optional[dict] = None) -> str:
    """:func:`settings_hash`, or with notebook parameters a hash of both."""
    if not notebook_parameters:
        return settings_hash(cfg)
    return short_hash({"settings": settings_hash(cfg), "notebook": notebook_parameters})


def run_id(parameters: dict, cfg: Config) -> str:
    """``head=linear_tune=false_1a2b3c4d``: the parameters' last name parts and values, then :func:`run_hash`."""
    parts = [f"{k.split('.')[-1]}={fmt_value(v)}" for k, v in parameters.items()]
    readable = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-_")[:80] or "base"
    nb = {k[len(NOTEBOOK_PREFIX):]: v for k, v in parameters.items() if k.startswith(NOTEBOOK_PREFIX)}
    return f"{readable}_{run_hash(cfg, nb)}"


def notebook_parameter_names() -> dict[str, str]:
    """``{name: notebook}`` of the parameters the numbered notebooks 01-05 declare (the first notebook naming each)."""
    import papermill as pm

    out: dict[str, str] = {}
    for path in report.list_notebooks():
        if path.name != COMPARE_NOTEBOOK:
            for name in pm.inspect_notebook(str(path)):
                out.setdefault(name, path.name)
    return out


def check_notebook_parameters(keys: Sequence[str]) -> None:
    """Each ``notebook.NAME`` must name a parameter a notebook declares; a misspelt one names the closest."""
    import difflib

    if not keys:
        return
    declared = notebook_parameter_names()
    for key in keys:
        name = key[len(NOTEBOOK_PREFIX):]
        if name in FROM_CONFIG:
            via = FROM_CONFIG[name]
            raise ConfigError(f"-p {key}: every run sets the notebooks' {name!r} from its config"
                              + (f"; use -p {via}=..." if via else " (paths are per run)"))
        if name not in declared:
            choices = sorted(n for n in declared if n not in FROM_CONFIG)
            close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
            hint = f"; did you mean {NOTEBOOK_PREFIX + close[0]!r}?" if close else ""
            raise ConfigError(f"-p {key}: no notebook has a parameter {name!r}{hint} "
                              f"(notebook parameters: {', '.join(choices)})")


@dataclass
class Run:
    """One planned run: its parameters, resolved config (paths still the base's) and id."""

    parameters: dict
    config: Config
    id: str
    base_data: dict = field(repr=False, default_factory=dict)

    @property
    def hash(self) -> str:
        return self.id.rsplit("_", 1)[-1]

    @property
    def settings(self) -> dict:
        """The ``section.key`` parameters (config settings)."""
        return {k: v for k, v in self.parameters.items() if not k.startswith(NOTEBOOK_PREFIX)}

    @property
    def notebook_parameters(self) -> dict:
        """The ``notebook.NAME`` parameters, without the prefix (passed to papermill)."""
        return {k[len(NOTEBOOK_PREFIX):]: v for k, v in self.parameters.items() if k.startswith(NOTEBOOK_PREFIX)}


def plan(config_path: str | os.PathLike, params: Sequence[str] = (), grid_file=None) -> list[Run]:
    """Validate the grid over the config file and return one :class:`Run` per combination.

    Every combination is validated before anything runs, so a misspelt
    parameter or a bad value stops at once, naming the ``-p`` and the closest
    valid name. Duplicate combinations (the same resolved settings) are dropped.
    """
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (copy application.yaml from the project root)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    grid = grid_from(params, grid_file)
    check_notebook_parameters([k for k in grid if k.startswith(NOTEBOOK_PREFIX)])
    _refuse_secret_parameters(grid)
    runs, seen = [], set()
    for combo in combinations(grid):
        settings = {k: v for k, v in combo.items() if not k.startswith(NOTEBOOK_PREFIX)}
        cfg = apply_overrides(data, settings, source=path.name, base_dir=path.resolve().parent)
        rid = run_id(combo, cfg)
        if rid.rsplit("_", 1)[-1] in seen:
            continue
        seen.add(rid.rsplit("_", 1)[-1])
        runs.append(Run(combo, cfg, rid, base_data=data))
    return runs


def _refuse_secret_parameters(grid: dict) -> None:
    """A parameter's values are written into run names, records and pages: a secret may not be one."""
    for key, values in grid.items():
        name = key.rsplit(".", 1)[-1]
        if key.startswith("index.elasticsearch.") and name in SECRET_KEYS:
            raise ConfigError(f"-p {key}: a secret cannot be an experiment parameter (its values would be written "
                              f"into run names and records); set it in the config or {SECRET_KEYS[name]}")
        text = json.dumps(values, default=str)
        if redact_text(text) != text:
            raise ConfigError(f"-p {key}: a value holds credentials (a URL's user:password or a token), which would "
                              "be written into run names and records; give them in the config or VS_ES_URL / "
                              "VS_ES_PASSWORD / VS_ES_API_KEY")


__all__ = ["COMPARE_NOTEBOOK", "FROM_CONFIG", "NOTEBOOK_PREFIX", "Run", "check_notebook_parameters", "combinations",
           "fmt_value", "grid_from", "hashed_settings", "load_grid_file", "notebook_parameter_names", "parse_param",
           "plan", "run_hash", "run_id", "settings_hash", "short_hash"]
