"""Running experiment runs: each run's config and shared caches, the pipeline and notebooks, its record.

Runs execute one after another through :class:`vslib.stages.Runner`; a failing
run is recorded as failed with its error and traceback and the others go on.
The comparison page is rewritten after each run.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import yaml

from vslib import classifier, report, stages
from vslib.atomic import atomic_write_text
from vslib.config import Config, ConfigError, load_config, merge, nested
from vslib.experiments.compare import metric_columns, metric_value, write_comparison
from vslib.experiments.plan import (COMPARE_NOTEBOOK, Run, fmt_value, hashed_settings, run_hash, settings_hash,
                                    short_hash)
from vslib.experiments.records import (METRICS, RECORD, RUN_CONFIG, find_run, read_record, runs_dir,
                                       snapshot_intact, write_json)
from vslib.paths import PROJ_ROOT
from vslib.redact import redact_config, redact_text, secrets_of, secrets_supplied, strip_userinfo

#: stages of one run, in order (``notebooks`` only when asked for)
STAGES = (*stages.STAGES, "notebooks")
#: distributions whose versions a run records
PACKAGES = ("visualsearch", "numpy", "pandas", "scikit-learn", "faiss-cpu", "tensorflow", "keras",
            "elasticsearch", "papermill")


def cache_keys(cfg: Config) -> dict:
    """Keys of the caches a run can share: the classifier's and the index's inputs."""
    d = hashed_settings(cfg)
    dataset, backbone = d["dataset"], {"name": d["backbone"]["name"], "weights": d["backbone"]["weights"]}
    tuning_k = int(max([cfg.search.k, *cfg.evaluation.ks]))  # what vslib.classifier.tuning_k tunes for
    return {
        "classifier": short_hash({"dataset": dataset, "backbone": backbone, "classifier": d["classifier"],
                             "tuning_k": tuning_k}),
        "index": short_hash({"dataset": dataset, "backbone": backbone, "index": d["index"]}),
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


def materialise(run: Run, root: Path) -> Config:
    """Write the run's ``config.yaml`` (absolute, per-run paths) under ``root/<id>`` and return it loaded.

    ``paths.reports`` is the run folder; ``paths.data`` and ``paths.models`` are
    the keyed cache folders, linked to the shared features, dataset folder and
    backbone weights of the base config.
    """
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
    header = (f"# run {run.id}: {', '.join(f'{k}={fmt_value(v)}' for k, v in run.parameters.items()) or 'the base config'}\n"
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
    runner = stages.Runner(cfg, echo=echo, header="-- {name}", progress=False, timings=timings, digits=3,
                           skip_done=("index",))

    def after(stage, out):
        # a reused classifier wrote its metrics into another run's folder: give this run its own copy
        if stage == "train" and not (cfg.reports_dir / classifier.METRICS_FILE).exists():
            _, metrics = out
            write_json(cfg.reports_dir / classifier.METRICS_FILE, metrics)
            if "confusion_matrix" in metrics:
                classifier.save_confusion_figure(metrics["confusion_matrix"],
                                                 cfg.figures_dir / classifier.CONFUSION_FIGURE,
                                                 title=f"Classifier ({cfg.dataset.name}, {cfg.backbone_tag}, "
                                                       f"{cfg.classifier.head} head), out of fold")

    # the prepare summary line, not the list of skipped files (the manifest keeps it; every run would repeat it)
    results = runner.run("evaluate", after=after, evaluate_echo=lambda m: None, prepare_echo=lambda m: echo(
        "\n".join(line for line in str(m).splitlines() if not line.startswith("  "))))["evaluate"]
    if "matplotlib.pyplot" in sys.modules:  # the evaluation's figures are saved; free them before the next run
        sys.modules["matplotlib.pyplot"].close("all")
    if notebooks:
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
                and (not notebooks or "notebooks" in old.get("timings", {})) and snapshot_intact(folder)):
            echo(f"{label}: reused (finished {old.get('finished')}; --force reruns it)")
            records.append(old)
            continue
        echo(f"{label}: " + (", ".join(f"{k}={fmt_value(v)}" for k, v in run.parameters.items()) or "base config"))
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
            write_json(folder / RECORD, record, secrets)
            for stale in (folder / "error.txt",):
                stale.unlink(missing_ok=True)
            results = execute(cfg, notebooks=notebooks, echo=echo, timings=record["timings"],
                              notebook_parameters=run.notebook_parameters)
            record["metrics"] = summarise(results)
            write_json(folder / METRICS, record["metrics"], secrets)
            record["status"] = "ok"
        except KeyboardInterrupt:
            record.update(status="failed", error="interrupted")
            record["finished"] = _now()
            write_json(folder / RECORD, record, secrets)
            raise
        except Exception as e:  # noqa: BLE001 - one failing run must not stop the others; recorded below
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "error.txt", redact_text(traceback.format_exc(), secrets))
            echo(f"{label}: FAILED: {redact_text(record['error'], secrets)}")
        record["finished"] = _now()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(folder / RECORD, record, secrets)
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


__all__ = ["PACKAGES", "STAGES", "cache_keys", "execute", "git_state", "materialise", "run_experiment", "summarise",
           "versions"]
