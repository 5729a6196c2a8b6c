"""Experiments: parameterised reruns of the pipeline, kept side by side, with a comparison page.

>>> runs = plan("application.yaml", ["classifier.head=ensemble,linear", "search.tune=true,false"])  # doctest: +SKIP
>>> records = run_experiment(runs)                                                               # doctest: +SKIP

Every combination of the parameters is one **run**: its own resolved config,
the pipeline (prepare, extract, train, index, evaluate) and optionally the
numbered notebooks, all into ``reports/runs/<run-id>/``. The id is readable
(``head=linear_tune=false``) and ends in a short hash of the resolved settings
(paths excluded), so a run never overwrites another and an identical run is
reused unless ``force``.

Caches are shared where their inputs match:

* features: ``<data>/features`` as always (keyed by backbone weights + image content);
* the dataset folder (manifest, converted images): ``<data>/<dataset>``;
* classifiers: ``<models>/experiments/classifier-<hash>`` keyed by the dataset,
  backbone, classifier settings and tuning depth (the classifier's own
  fingerprint then checks the training data);
* indexes: ``<data>/experiments/index-<hash>`` keyed by the dataset, backbone
  and index settings.

Each run's ``paths.data`` / ``paths.models`` point at those keyed folders, which
link back to the shared feature cache, dataset folder and backbone weights,
so the notebooks (which receive the run's ``config.yaml``) see exactly what
the pipeline used. Runs execute one after another; a failing run is recorded
as failed with its error and the others go on.

Per run: ``run.json`` (parameters, resolved config, versions, git commit,
timings per stage, metrics, status, error), ``config.yaml``, ``metrics.json``,
the evaluation files and figures, and the notebook reports. Over all runs:
``reports/runs/index.html`` (:func:`write_comparison`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import html
import itertools
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from vslib import stages
from vslib.atomic import atomic_write_json, atomic_write_text
from vslib.config import Config, ConfigError, apply_overrides, parse_value
from vslib.integrity import DamagedFile, audit_file, verify
from vslib.redact import (SECRET_KEYS, is_marker, redact_config, redact_obj, redact_text, secrets_of,
                          secrets_supplied, strip_userinfo)
from vslib.paths import PROJ_ROOT

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
RECORD = "run.json"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.json"
COMPARISON_PAGE = "index.html"
COMPARISON_FIGURE = "precision_at_k_by_mode.png"
COMPARE_NOTEBOOK = "06_compare_runs.ipynb"
#: stages of one run, in order (``notebooks`` only when asked for)
STAGES = (*stages.STAGES, "notebooks")
#: ``-p notebook.NAME=value`` sets the notebooks' own parameter NAME
NOTEBOOK_PREFIX = "notebook."
#: notebook parameters every run derives from its config (set them through the config's keys)
FROM_CONFIG = {"config_path": "", "dataset": "dataset.name", "backbone": "backbone.name", "backend": "index.backend",
               "max_per_class": "dataset.max_per_class", "max_queries": "evaluation.max_queries",
               "data_dir": "", "models_dir": "", "reports_dir": ""}
#: distributions whose versions a run records
PACKAGES = ("visualsearch", "numpy", "pandas", "scikit-learn", "faiss-cpu", "tensorflow", "keras",
            "elasticsearch", "papermill")


# ---------------------------------------------------------------------------
# Parameters


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


# ---------------------------------------------------------------------------
# Runs


def _hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def settings_hash(cfg: Config) -> str:
    """Short hash of everything a run depends on in ``cfg`` (paths excluded)."""
    return _hash(_settings(cfg))


def _settings(cfg: Config) -> dict:
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
    return _hash({"settings": settings_hash(cfg), "notebook": notebook_parameters})


def run_id(parameters: dict, cfg: Config) -> str:
    """``head=linear_tune=false_1a2b3c4d``: the parameters' last name parts and values, then :func:`run_hash`."""
    parts = [f"{k.split('.')[-1]}={_fmt(v)}" for k, v in parameters.items()]
    readable = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-_")[:80] or "base"
    nb = {k[len(NOTEBOOK_PREFIX):]: v for k, v in parameters.items() if k.startswith(NOTEBOOK_PREFIX)}
    return f"{readable}_{run_hash(cfg, nb)}"


def notebook_parameter_names() -> dict[str, str]:
    """``{name: notebook}`` of the parameters the numbered notebooks 01-05 declare (the first notebook naming each)."""
    import papermill as pm

    from vslib import report

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


def runs_dir(cfg: Config) -> Path:
    """``<reports>/runs`` of the base config."""
    return cfg.reports_dir / RUNS_DIR


def cache_keys(cfg: Config) -> dict:
    """Keys of the caches a run can share: the classifier's and the index's inputs."""
    d = _settings(cfg)
    dataset, backbone = d["dataset"], {"name": d["backbone"]["name"], "weights": d["backbone"]["weights"]}
    tuning_k = int(max([cfg.search.k, *cfg.evaluation.ks]))  # what vslib.classifier.tuning_k tunes for
    return {
        "classifier": _hash({"dataset": dataset, "backbone": backbone, "classifier": d["classifier"],
                             "tuning_k": tuning_k}),
        "index": _hash({"dataset": dataset, "backbone": backbone, "index": d["index"]}),
    }


def _link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` (created if missing); an existing correct link is kept."""
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        raise ConfigError(f"{link} exists and is not a link to the shared cache {target}; move it away and rerun")
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError as e:
        raise OSError(f"cannot create the link {link} -> {target} ({e.strerror}); the experiment needs a "
                      "file system with symbolic links for its shared caches") from None


def find_run(root: Path, settings: str) -> Optional[Path]:
    """The folder under ``root`` holding a run of these settings (hash), whatever its readable name."""
    for folder in sorted(Path(root).glob(f"*_{settings}")):
        rec = read_record(folder)
        if rec is not None and rec.get("hash") == settings:
            return folder
    return None


def materialise(run: Run, root: Path) -> Config:
    """Write the run's ``config.yaml`` (absolute, per-run paths) under ``root/<id>`` and return it loaded.

    ``paths.reports`` is the run folder; ``paths.data`` and ``paths.models`` are
    the keyed cache folders, linked to the shared features, dataset folder and
    backbone weights of the base config.
    """
    from vslib.config import load_config, merge, nested

    base = run.config
    keys = cache_keys(base)
    shared_data, shared_models = base.data_dir.resolve(), base.models_dir.resolve()
    data_dir = shared_data / "experiments" / f"index-{keys['index']}"
    models_dir = shared_models / "experiments" / f"classifier-{keys['classifier']}"
    _link(data_dir / "features", shared_data / "features")
    _link(data_dir / base.dataset.name, shared_data / base.dataset.name)
    _link(models_dir / "backbones", shared_models / "backbones")
    out = root / run.id
    out.mkdir(parents=True, exist_ok=True)
    resolved = dict(run.base_data)
    for key, value in run.settings.items():
        resolved = merge(resolved, nested(key, value))  # as apply_overrides merged them
    resolved["paths"] = {"data": str(data_dir), "models": str(models_dir), "reports": str(out.resolve())}
    if base.dataset.root:
        resolved.setdefault("dataset", {})["root"] = str(base.path(base.dataset.root).resolve())
    if base.backbone.weights and base.backbone.weights != "imagenet":
        resolved.setdefault("backbone", {})["weights"] = str(base.path(base.backbone.weights).resolve())
    header = (f"# run {run.id}: {', '.join(f'{k}={_fmt(v)}' for k, v in run.parameters.items()) or 'the base config'}\n"
              f"# written by `visualsearch experiment` from {base.base_dir / base.source}\n")
    secret_note = ("# secrets are not written here: set VS_ES_PASSWORD / VS_ES_API_KEY / VS_ES_URL to rerun it\n"
                   if secrets_of(base) else "")
    atomic_write_text(out / RUN_CONFIG, header + secret_note + yaml.safe_dump(redact_config(resolved), sort_keys=False),
                      verified=True)
    with secrets_supplied():  # they come from the base config, in memory
        cfg = load_config(out / RUN_CONFIG)
    _carry_secrets(base, cfg)
    if run_hash(cfg, run.notebook_parameters) != run.hash:  # the written file must describe exactly the planned run
        raise RuntimeError(f"{out / RUN_CONFIG} does not reproduce run {run.id} (settings hash {settings_hash(cfg)})")
    return cfg


def _carry_secrets(base: Config, cfg: Config) -> None:
    """Give the run's config (read back from its redacted file) the base config's secrets, in memory only."""
    src, dst = base.index.elasticsearch, cfg.index.elasticsearch
    for key in ("password", "api_key", "ca_certs"):
        if getattr(dst, key) is None and getattr(src, key) is not None:
            setattr(dst, key, getattr(src, key))
    if [strip_userinfo(h) for h in src.hosts] == list(dst.hosts):
        dst.hosts = list(src.hosts)


def read_record(folder: Path) -> Optional[dict]:
    """The run record in ``folder``; None when there is none, or when it is damaged (then the run counts as not run,
    and the next experiment reruns it: a warning says so)."""
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    try:
        verify(path, full=True, redo="the next `visualsearch experiment` reruns this run")
        return json.loads(path.read_text(encoding="utf-8"))
    except DamagedFile as e:
        log.warning("%s", e)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable run record (%s); the next `visualsearch experiment` reruns this run", path, e)
    return None


def _snapshot_intact(folder: Path) -> bool:
    """Whether the run's ``config.yaml`` matches its checksum (a damaged one: a warning, and the run counts as not
    run, so it is run again and the snapshot rewritten)."""
    path = Path(folder) / RUN_CONFIG
    try:
        verify(path, full=True, redo="the next `visualsearch experiment` reruns this run")
    except DamagedFile as e:
        log.warning("%s", e)
        return False
    except OSError as e:
        log.warning("%s: unreadable config snapshot (%s); the next `visualsearch experiment` reruns this run", path, e)
        return False
    return True


def _write_json(path: Path, obj: Any, secrets=()) -> None:
    """Strict JSON with a checksum sidecar; every string scrubbed of ``secrets`` (and URL userinfo, tokens)."""
    atomic_write_json(path, redact_obj(obj, secrets), default=str, verified=True)


def audit(cfg: Config) -> list:
    """Full check of every run under the config's runs folder: its record, config snapshot and metrics
    (a :class:`~vslib.integrity.Finding` each; damage is reported, never raised)."""
    root = runs_dir(cfg)
    out = []
    redo = "the next `visualsearch experiment` reruns this run"
    for folder in sorted(p.parent for p in root.glob(f"*/{RECORD}")) if root.is_dir() else []:
        for name, what, parse in ((RECORD, "run record", json.loads), (METRICS, "run metrics", json.loads),
                                  (RUN_CONFIG, "run config snapshot", yaml.safe_load)):
            path = folder / name
            if name == METRICS and not path.exists():
                continue  # a run that failed or is under way has none yet
            finding = audit_file(path, what, redo)
            if not finding.bad:  # also a file written before checksums were recorded must parse
                try:
                    parse(path.read_text(encoding="utf-8"))
                except (OSError, ValueError, yaml.YAMLError) as e:
                    finding.status, finding.reason = "damaged", f"unreadable: {str(e).splitlines()[0]}"
            out.append(finding)
    return out


def versions() -> dict:
    """Python, platform and the versions of the packages a result depends on (not imported: read from metadata)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(folder: Path = PROJ_ROOT) -> dict:
    """``{"commit", "dirty"}`` of the checkout holding the code (None when it is not a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def summarise(results: dict) -> dict:
    """The metrics a comparison needs, from an evaluation result (``evaluation.json``)."""
    out = {k: results.get(k) for k in ("classifier_accuracy", "classifier_top3", "nn1_accuracy",
                                        "logreg_accuracy", "n_index", "n_query") if k in results}
    out["modes"] = {m: {k: v for k, v in s.items() if k.startswith(("p@", "map@"))}
                    for m, s in results.get("modes", {}).items()}
    gain = results.get("hierarchy_gain", {})
    out["gain"] = {name: {k: g.get("mean") for k, g in by_k.items()} for name, by_k in gain.items()}
    out["gain_ci95"] = {name: {k: g.get("ci95") for k, g in by_k.items()} for name, by_k in gain.items()}
    out["search_settings"] = results.get("search_settings")
    return out


def execute(cfg: Config, *, notebooks: bool = True, echo: Callable[[str], None] = print,
            timings: Optional[dict] = None, notebook_parameters: Optional[dict] = None) -> dict:
    """Run the pipeline (and the numbered notebooks) on one run's config; return the evaluation results.

    ``timings`` is filled with seconds per stage as they finish (so a failure keeps the finished ones).
    The index folder is keyed by dataset, backbone and index settings, so an index holding as many items as
    the index split is reused (:func:`vslib.stages.index_action`).
    """
    from vslib import classifier

    runner = stages.Runner(cfg, echo=echo, header="-- {name}", progress=False, timings=timings, digits=3,
                           skip_done=("index",))

    def after(stage, out):
        # a reused classifier wrote its metrics into another run's folder: give this run its own copy
        if stage == "train" and not (cfg.reports_dir / classifier.METRICS_FILE).exists():
            _, metrics = out
            _write_json(cfg.reports_dir / classifier.METRICS_FILE, metrics)
            if "confusion_matrix" in metrics:
                classifier.save_confusion_figure(metrics["confusion_matrix"],
                                                 cfg.figures_dir / classifier.CONFUSION_FIGURE,
                                                 title=f"Classifier ({cfg.dataset.name}, {cfg.backbone.name}, "
                                                       f"{cfg.classifier.head} head), out of fold")

    # the prepare summary line, not the list of skipped files (the manifest keeps it; every run would repeat it)
    results = runner.run("evaluate", after=after, evaluate_echo=lambda m: None, prepare_echo=lambda m: echo(
        "\n".join(line for line in str(m).splitlines() if not line.startswith("  "))))["evaluate"]
    if "matplotlib.pyplot" in sys.modules:  # the evaluation's figures are saved; free them before the next run
        sys.modules["matplotlib.pyplot"].close("all")
    if notebooks:
        from vslib import report

        names = [p.name for p in report.list_notebooks() if p.name != COMPARE_NOTEBOOK]
        runner.stage("notebooks", lambda: report.run_notebooks(cfg, names, parameters=notebook_parameters,
                                                               echo=echo))
    return results


def run_experiment(runs: Sequence[Run], *, root: Optional[Path] = None, force: bool = False,
                   notebooks: bool = True, echo: Callable[[str], None] = print) -> list[dict]:
    """Execute the planned runs one after another into ``root`` (default ``<reports>/runs``); return their records.

    A run whose folder already holds a successful record of the same settings
    (and notebooks, when asked for) is reused unless ``force``. A failing run
    is recorded as ``failed`` with its error and traceback; the next one starts
    regardless. The comparison page is rewritten at the end (and after each run).
    """
    if not runs:
        return []
    root = Path(root) if root is not None else runs_dir(runs[0].config)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for n, run in enumerate(runs, 1):
        found = find_run(root, run.hash)  # the same settings, perhaps asked for with other -p spellings
        if found is not None:
            run.id = found.name
        folder = root / run.id
        old = read_record(folder)
        if old is not None and old.get("hash") != run.hash:
            raise RuntimeError(f"{folder} holds run {old.get('id')} of other settings (hash {old.get('hash')}); "
                               "refusing to overwrite it")
        label = f"[{n}/{len(runs)}] {run.id}"
        secrets = secrets_of(run.config)
        if (old is not None and not force and old.get("status") == "ok"
                and (not notebooks or "notebooks" in old.get("timings", {})) and _snapshot_intact(folder)):
            echo(f"{label}: reused (finished {old.get('finished')}; --force reruns it)")
            records.append(old)
            continue
        echo(f"{label}: " + (", ".join(f"{k}={_fmt(v)}" for k, v in run.parameters.items()) or "base config"))
        record = {"id": run.id, "hash": run.hash, "parameters": run.parameters, "status": "running",
                  "started": _now(), "finished": None, "timings": {}, "error": None,
                  "git": git_state(), "versions": versions(), "notebooks": notebooks,
                  # the planned settings; replaced by the run's own config (paths included) once it is written
                  "config": run.config.to_dict(), "notebook_parameters": run.notebook_parameters}
        t0 = time.perf_counter()
        try:
            cfg = materialise(run, root)
            record["config"] = cfg.to_dict()
            record["caches"] = {"classifier": str(cfg.classifier_dir), "index": str(cfg.index_dir),
                                "features": str(cfg.features_dir)}
            _write_json(folder / RECORD, record, secrets)
            for stale in (folder / "error.txt",):
                stale.unlink(missing_ok=True)
            results = execute(cfg, notebooks=notebooks, echo=echo, timings=record["timings"],
                              notebook_parameters=run.notebook_parameters)
            record["metrics"] = summarise(results)
            _write_json(folder / METRICS, record["metrics"], secrets)
            record["status"] = "ok"
        except KeyboardInterrupt:
            record.update(status="failed", error="interrupted")
            record["finished"] = _now()
            _write_json(folder / RECORD, record, secrets)
            raise
        except Exception as e:  # noqa: BLE001 - one failing run must not stop the others; recorded below
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "error.txt", redact_text(traceback.format_exc(), secrets))
            echo(f"{label}: FAILED: {redact_text(record['error'], secrets)}")
        record["finished"] = _now()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        _write_json(folder / RECORD, record, secrets)
        records.append(record)
        if record["status"] == "ok":
            shown = [c for c in metric_columns([record]) if "adaptive" in c or c == "classifier_accuracy"]
            echo(f"{label}: ok in {record['seconds']:.1f} s: "
                 + ", ".join(f"{c} {metric_value(record, c):.3f}" for c in shown
                             if metric_value(record, c) is not None))
        write_comparison(root)
    page = write_comparison(root)
    failed = [r["id"] for r in records if r.get("status") != "ok"]
    echo(f"{len(records)} runs, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; comparison: {page}")
    return records


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Comparing runs


def load_runs(root: str | os.PathLike) -> list[dict]:
    """Every run record under ``root`` (``reports/runs``), oldest first."""
    root = Path(root)
    recs = [r for r in (read_record(p) for p in sorted(root.iterdir()) if p.is_dir()) if r] if root.is_dir() else []
    return sorted(recs, key=lambda r: (r.get("started") or "", r.get("id", "")))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "index_options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _values(record: dict) -> dict:
    """``{section.key: value}`` of a run's settings (paths excluded) and ``{notebook.NAME: value}``."""
    out = _flatten({k: v for k, v in (record.get("config") or {}).items() if k != "paths"})
    out.update({NOTEBOOK_PREFIX + k: v for k, v in (record.get("notebook_parameters") or {}).items()})
    return out


def differing_parameters(records: Sequence[dict]) -> list[str]:
    """Setting names (``section.key``, ``notebook.NAME``) whose values differ between the runs (paths excluded)."""
    flat = [_values(r) for r in records]
    keys = sorted(set().union(*flat)) if flat else []
    given = [k for r in records for k in r.get("parameters", {})]
    order = list(dict.fromkeys(given)) + [k for k in keys if k not in given]
    return [k for k in order if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def metric_columns(records: Sequence[dict]) -> list[str]:
    """Metric column names: classifier and 1-NN accuracy, p@(smallest, largest k) per mode, hierarchy gain."""
    ks, modes = set(), []
    for r in records:
        for m, s in ((r.get("metrics") or {}).get("modes") or {}).items():
            modes.append(m)
            ks |= {int(c[2:]) for c in s if c.startswith("p@")}
    modes = list(dict.fromkeys(modes))
    pick = sorted({min(ks), max(ks)}) if ks else []
    cols = ["classifier_accuracy", "nn1_accuracy"]
    cols += [f"{m} p@{k}" for m in modes if m != "oracle" for k in pick]  # oracle: a diagnostic, in the figure only
    cols += [f"gain p@{k}" for k in pick]
    return cols


def metric_value(record: dict, column: str) -> Optional[float]:
    m = record.get("metrics") or {}
    if column.startswith("gain "):
        return ((m.get("gain") or {}).get("adaptive_vs_flat") or {}).get(column[5:])
    if " " in column:
        mode, k = column.split(" ", 1)
        return ((m.get("modes") or {}).get(mode) or {}).get(k)
    return m.get(column)


def runs_table(records: Sequence[dict]):
    """A DataFrame: one row per run with its status, differing parameters, metrics and seconds."""
    import pandas as pd

    params = differing_parameters(records)
    metrics = metric_columns(records)
    rows = []
    for r in records:
        flat = _values(r)
        row = {"run": r.get("id"), "status": r.get("status")}
        row.update({p: flat.get(p) for p in params})
        row.update({c: metric_value(r, c) for c in metrics})
        row["seconds"] = r.get("seconds")
        row["error"] = r.get("error")
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "status", *params, *metrics, "seconds", "error"])


def plot_precision(records: Sequence[dict], save_as: Optional[Path] = None):
    """One panel per mode, p@k against k, one line per successful run; returns the figure."""
    import matplotlib

    if save_as is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and (r.get("metrics") or {}).get("modes")]
    modes = list(dict.fromkeys(m for r in ok for m in r["metrics"]["modes"]))
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(3.6 * max(1, len(modes)), 3.4), sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for i, r in enumerate(ok):
            s = r["metrics"]["modes"].get(mode, {})
            ks = sorted(int(c[2:]) for c in s if c.startswith("p@"))
            ax.plot(ks, [s[f"p@{k}"] for k in ks], marker="o", color=plt.cm.tab10(i % 10), label=r["id"])
        ax.set_title(mode)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision@k")
    if ok:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=min(2, len(ok)), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0))
        fig.tight_layout(rect=(0, 0.08 + 0.045 * ((len(ok) + 1) // 2), 1, 1))
    if save_as is not None:
        Path(save_as).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_as, dpi=110)
        plt.close(fig)
    return fig


_SORT_JS = """
document.querySelectorAll('table.runs th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.dir !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(function (h) { h.dataset.dir = ''; h.classList.remove('asc', 'desc'); });
    th.dataset.dir = asc ? 'asc' : 'desc'; th.classList.add(asc ? 'asc' : 'desc');
    function key(r) { var c = r.cells[col]; var v = c.dataset.v !== undefined ? c.dataset.v : c.textContent.trim();
                      var n = parseFloat(v); return (v !== '' && !isNaN(n) && isFinite(v)) ? n : v.toLowerCase(); }
    rows.sort(function (a, b) { var x = key(a), y = key(b);
      if (typeof x !== typeof y) return typeof x === 'number' ? -1 : 1;
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _cell(value: Any) -> str:
    if value is None:
        return '<td data-v="" class="na">–</td>'
    if isinstance(value, float):
        return f'<td data-v="{value!r}" class="num">{value:.3f}</td>'
    if isinstance(value, bool):
        return f"<td>{_fmt(value)}</td>"
    if isinstance(value, int):
        return f'<td data-v="{value}" class="num">{value}</td>'
    return f"<td>{html.escape(_fmt(value))}</td>"


def write_comparison(root: str | os.PathLike) -> Path:
    """Write ``root/index.html``: one sortable table of every run, p@k per mode, links to each run's reports."""
    root = Path(root)
    # records written before secrets were redacted must not publish theirs here
    records = [dict(r, config=redact_config(r.get("config")), error=redact_text(r["error"]) if r.get("error") else None)
               for r in load_runs(root)]
    table = runs_table(records)
    params = differing_parameters(records)
    metrics = metric_columns(records)
    fig_path = root / COMPARISON_FIGURE
    if any(r.get("status") == "ok" for r in records):
        plot_precision(records, save_as=fig_path)
    n_ok = sum(r.get("status") == "ok" for r in records)
    counts: dict = {}
    for r in records:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    head = ["run", "status", *params, *metrics, "seconds"]
    # the best value of a metric, where the runs differ in it
    best = {c: table[c].max() for c in metrics if c in table and table[c].notna().any() and table[c].nunique() > 1}
    rows = []
    for r, (_, row) in zip(records, table.iterrows()):
        rid = r["id"]
        colour = {"ok": "#1a9850", "failed": "#d73027"}.get(r.get("status"), "#777")
        links = []
        for name, label in (("index.html", "notebooks"), ("evaluation.md", "evaluation"), (RECORD, "record"),
                            (RUN_CONFIG, "config"), ("error.txt", "traceback")):
            if (root / rid / name).exists():
                links.append(f'<a href="{html.escape(rid)}/{name}">{label}</a>')
        cells = [f'<td><a href="{html.escape(rid)}/">{html.escape(rid)}</a><br><small>{" · ".join(links)}</small></td>',
                 f'<td style="color:{colour}"><b>{html.escape(str(r.get("status")))}</b>'
                 + (f'<br><small>{html.escape(str(r.get("error"))[:300])}</small>' if r.get("error") else "")
                 + "</td>"]
        cells += [_cell(_plain(row[p])) for p in params]
        for c in metrics:
            v = _plain(row[c])
            cell = _cell(v)
            if v is not None and c in best and v == best[c]:
                cell = cell.replace("<td ", '<td style="font-weight:bold" ', 1)
            cells.append(cell)
        cells.append(_cell(_plain(row["seconds"])))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    common = {}
    if records:
        flat = _values(records[-1])
        common = {k: v for k, v in flat.items() if k not in params}
    thumbs = []
    for r in records:
        fig = root / r["id"] / "figures" / "precision_at_k.png"
        if fig.exists():
            thumbs.append(f'<figure><a href="{html.escape(r["id"])}/figures/precision_at_k.png"><img src="'
                          f'{html.escape(r["id"])}/figures/precision_at_k.png" width="300"></a>'
                          f'<figcaption>{html.escape(r["id"])}</figcaption></figure>')
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>VisualSearch runs</title><style>",
        "body{font-family:sans-serif;margin:2em;}table{border-collapse:collapse;font-size:.9em}"
        "td,th{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3;cursor:pointer;white-space:nowrap}th.asc::after{content:' ▲'}th.desc::after{content:' ▼'}"
        "td.num{text-align:right;font-variant-numeric:tabular-nums}td.na{color:#aaa;text-align:center}"
        "figure{display:inline-block;margin:.5em}figcaption{font-size:.8em;max-width:300px;word-break:break-all}"
        "details{margin:1em 0}code{font-size:.9em}",
        "</style></head><body>",
        "<h1>VisualSearch experiment runs</h1>",
        f"<p>{len(records)} runs ({', '.join(f'{v} {k}' for k, v in counts.items()) or 'none yet'}) in <code>{html.escape(str(root))}</code>; "
        f"page written {time.strftime('%Y-%m-%d %H:%M:%S')}. Click a column header to sort. "
        "Metrics are on the held-out query split: <i>classifier_accuracy</i> is the classifier's top-1, "
        "<i>nn1_accuracy</i> the label of the single nearest indexed image, <i>MODE p@k</i> precision at k, "
        "<i>gain p@k</i> adaptive minus flat (the hierarchy gain); <i>oracle</i> (filtered to the true class) is "
        "a diagnostic, drawn below but not tabled. Where runs differ in a metric, the best value is bold.</p>",
        '<table class="runs"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>", *rows, "</tbody></table>",
    ]
    if common:
        parts.append("<details><summary>Settings shared by all runs (from the latest run)</summary><table>"
                     + "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(_fmt(v))}</td></tr>"
                               for k, v in common.items()) + "</table></details>")
    if fig_path.exists() and n_ok:
        parts += ["<h2>Precision@k per mode</h2>", f'<p><img src="{COMPARISON_FIGURE}" style="max-width:100%"></p>']
    if thumbs:
        parts += ["<h2>Each run's precision@k</h2>", "<div>", *thumbs, "</div>"]
    parts += [f"<script>{_SORT_JS}</script>", "</body></html>"]
    out = root / COMPARISON_PAGE
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _plain(v: Any) -> Any:
    """A pandas cell as a plain Python value (NaN -> None)."""
    try:
        import pandas as pd

        if v is None or (not isinstance(v, (list, dict, str)) and pd.isna(v)):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(v, "item"):
        return v.item()
    return v


__all__ = ["Run", "combinations", "differing_parameters", "execute", "grid_from", "load_grid_file", "load_runs",
           "materialise", "metric_columns", "parse_param", "plan", "plot_precision", "run_experiment", "run_id",
           "runs_dir", "runs_table", "settings_hash", "summarise", "write_comparison"]
