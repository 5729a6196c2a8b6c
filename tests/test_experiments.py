"""Experiments: parameter grids, run ids, runs kept side by side, shared caches, failed runs, the comparison page.

The pipeline tests run a real 2x2 grid on a small Tux Paint subset (8 images a
class) in a temporary project, without the notebooks; one test runs the
comparison notebook over the records they leave.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import tux_data
from vslib import experiments
from vslib.config import ConfigError, load_config
from vslib.experiments import combinations, grid_from, parse_param, plan, run_experiment

SMALL = tux_data(dataset={"max_per_class": 8}, evaluation={"max_queries": 24, "grid_queries": 0})


def _write(dir_: Path, data: dict) -> Path:
    p = Path(dir_) / "application.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ---------------------------------------------------------------------------
# Parameters


def test_parse_param_reads_values_as_yaml_and_commas_as_a_grid():
    assert parse_param("search.mass=0.8") == ("search.mass", [0.8])
    assert parse_param("search.tune=true,false") == ("search.tune", [True, False])
    assert parse_param("classifier.head = linear, knn") == ("classifier.head", ["linear", "knn"])
    assert parse_param("classifier.C=null") == ("classifier.C", [None])
    assert parse_param("evaluation.ks=[1, 5, 10]") == ("evaluation.ks", [[1, 5, 10]])  # one list value
    with pytest.raises(ConfigError, match="write section.key=value"):
        parse_param("search.mass")
    with pytest.raises(ConfigError, match="empty value"):
        parse_param("classifier.head=linear,,knn")


def test_grid_file_and_params_make_the_cartesian_product(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("parameters:\n  classifier.head: [linear, knn]\n  search.mass: 0.8\n")
    grid = grid_from(["search.tune=true,false"], grid_file)
    assert grid == {"classifier.head": ["linear", "knn"], "search.mass": [0.8], "search.tune": [True, False]}
    combos = combinations(grid)
    assert len(combos) == 4
    assert combos[0] == {"classifier.head": "linear", "search.mass": 0.8, "search.tune": True}
    assert combos[-1] == {"classifier.head": "knn", "search.mass": 0.8, "search.tune": False}
    # a -p replaces the file's values of its key
    assert grid_from(["classifier.head=ensemble"], grid_file)["classifier.head"] == ["ensemble"]
    with pytest.raises(ConfigError, match="paths are set per run"):
        grid_from(["paths.reports=elsewhere"])


def test_misspelt_or_bad_parameters_stop_before_anything_runs(tmp_path):
    cfg = _write(tmp_path, SMALL)
    with pytest.raises(ConfigError) as e:
        plan(cfg, ["classifier.hed=linear"])
    assert "-p classifier.hed=linear" in str(e.value) and "did you mean 'classifier.head'?" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key 'serch' in the top level; did you mean 'search'"):
        plan(cfg, ["serch.mass=0.5"])
    with pytest.raises(ConfigError, match=r"classifier.head 'lineer' is not allowed; did you mean 'linear'"):
        plan(cfg, ["classifier.head=linear,lineer"])
    with pytest.raises(ConfigError, match=r"search.mass is 2.0; allowed values are between 0.0 and 1.0"):
        plan(cfg, ["search.mass=2"])
    with pytest.raises(ConfigError, match="search is a section, not a setting"):
        plan(cfg, ["search=1"])
    assert not (tmp_path / "reports").exists()


def test_run_ids_are_readable_and_keyed_by_the_resolved_settings(tmp_path):
    cfg = _write(tmp_path, SMALL)
    runs = plan(cfg, ["classifier.head=ensemble,linear", "search.tune=true,false"])
    ids = [r.id for r in runs]
    assert len(set(ids)) == 4
    assert ids[1].startswith("head=ensemble_tune=false_") and len(ids[1].rsplit("_", 1)[1]) == 8
    assert [r.id for r in plan(cfg, ["classifier.head=ensemble,linear", "search.tune=true,false"])] == ids
    # the same settings however they are asked for: one hash, duplicates dropped
    default = plan(cfg)[0]
    assert default.id.startswith("base_")
    assert plan(cfg, ["classifier.head=ensemble"])[0].hash == default.hash  # ensemble is the default
    assert len(plan(cfg, ["search.mass=0.9,0.90"])) == 1
    # another base config with the same -p is another run
    (tmp_path / "other").mkdir()
    other = _write(tmp_path / "other", {**SMALL, "search": {"k": 5}})
    assert plan(other, ["classifier.head=ensemble"])[0].hash != default.hash


def test_notebook_parameters_are_validated_and_part_of_the_run(tmp_path):
    from vslib.experiments import notebook_parameter_names

    cfg = _write(tmp_path, SMALL)
    declared = notebook_parameter_names()
    name = next(n for n in declared if n not in experiments.FROM_CONFIG)  # one of the notebooks' own tunables
    base = plan(cfg)[0]
    runs = plan(cfg, [f"notebook.{name}=3"])
    assert runs[0].notebook_parameters == {name: 3} and runs[0].settings == {}
    assert runs[0].hash != base.hash and experiments.settings_hash(runs[0].config) == base.hash
    with pytest.raises(ConfigError) as e:
        plan(cfg, [f"notebook.{name[:-1]}X=3"])
    assert f"did you mean 'notebook.{name}'?" in str(e.value)
    with pytest.raises(ConfigError, match=r"use -p dataset.name=\.\.\."):
        plan(cfg, ["notebook.dataset=fashion-mnist"])


# ---------------------------------------------------------------------------
# Running grids (real pipeline, no notebooks)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    return _write(root, SMALL)


@pytest.fixture(scope="module")
def grid(project):
    """A 2x2 grid run once for the module: ``(config path, records, echo lines)``."""
    lines = []
    records = run_experiment(plan(project, ["classifier.head=linear,knn", "search.tune=true,false"]),
                             notebooks=False, echo=lines.append)
    return project, records, lines


def _files(*dirs: Path) -> dict:
    """``{path: mtime_ns}`` of every file under ``dirs`` (links followed once)."""
    out = {}
    for d in dirs:
        for base, _, names in os.walk(d, followlinks=True):
            for n in names:
                p = Path(base) / n
                out[str(p)] = p.stat().st_mtime_ns
    return out


def test_a_2x2_grid_runs_into_four_folders_with_records_and_a_comparison_page(grid):
    project, records, _ = grid
    runs = project.parent / "reports" / "runs"
    assert [r["status"] for r in records] == ["ok"] * 4, [r.get("error") for r in records]
    folders = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert folders == sorted(r["id"] for r in records)
    for r in records:
        folder = runs / r["id"]
        rec = json.loads((folder / "run.json").read_text())
        assert rec["status"] == "ok" and rec["hash"] == r["id"].rsplit("_", 1)[1]
        assert set(rec["timings"]) == {"prepare", "extract", "train", "index", "evaluate"}
        assert rec["versions"]["numpy"] and rec["versions"]["python"]
        assert "commit" in rec["git"]
        assert rec["config"]["classifier"]["head"] == rec["parameters"]["classifier.head"]
        # the run's own evaluation, in its own folder, agrees with its record
        evaluation = json.loads((folder / "evaluation.json").read_text())
        assert evaluation["head"] == rec["parameters"]["classifier.head"]
        assert rec["metrics"]["modes"]["adaptive"]["p@10"] == evaluation["modes"]["adaptive"]["p@10"]
        assert 0 < rec["metrics"]["classifier_accuracy"] <= 1 and 0 < rec["metrics"]["nn1_accuracy"] <= 1
        assert (folder / "classifier_metrics.json").exists() and (folder / "figures" / "precision_at_k.png").exists()
        # config.yaml rebuilds exactly this run (what the notebooks receive)
        cfg = load_config(folder / "config.yaml")
        assert experiments.settings_hash(cfg) == rec["hash"] and cfg.reports_dir == folder.resolve()
    page = (runs / "index.html").read_text()
    for r in records:
        assert f'href="{r["id"]}/"' in page
    for column in ("classifier.head", "search.tune", "classifier_accuracy", "nn1_accuracy", "flat p@1",
                   "adaptive p@10", "hierarchical p@1", "gain p@10"):
        assert f"<th>{column}</th>" in page
    assert "<th>search.mass</th>" not in page  # only the parameters that differ are columns
    assert (runs / "precision_at_k_by_mode.png").stat().st_size > 10_000


def test_runs_share_caches_by_their_own_inputs(grid):
    project, records, _ = grid
    base = project.parent
    # one classifier per head (search.tune does not change training), one index for all four runs
    assert len(list((base / "models" / "experiments").iterdir())) == 2
    assert len(list((base / "data" / "experiments").iterdir())) == 1
    by = {(r["parameters"]["classifier.head"], r["parameters"]["search.tune"]): r for r in records}
    for head in ("linear", "knn"):
        assert by[(head, True)]["caches"]["classifier"] == by[(head, False)]["caches"]["classifier"]
    assert by[("linear", True)]["caches"]["classifier"] != by[("knn", True)]["caches"]["classifier"]
    # the shared feature cache is the project's own, reached through a link
    feats = Path(records[0]["caches"]["features"])
    assert feats.resolve().is_relative_to((base / "data" / "features").resolve())


def test_rerunning_computes_nothing_and_one_changed_parameter_adds_one_run(grid):
    project, records, _ = grid
    base = project.parent
    before = _files(base / "data", base / "models", base / "reports")
    lines = []
    again = run_experiment(plan(project, ["classifier.head=linear,knn", "search.tune=true,false"]),
                           notebooks=False, echo=lines.append)
    assert [r["finished"] for r in again] == [r["finished"] for r in records]
    assert sum("reused" in ln for ln in lines) == 4
    after = _files(base / "data", base / "models", base / "reports")
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed <= {str(base / "reports" / "runs" / n) for n in ("index.html", "precision_at_k_by_mode.png")}

    one = run_experiment(plan(project, ["classifier.head=linear", "search.tune=false", "search.class_weight=0.5"]),
                         notebooks=False, echo=lambda m: None)
    assert one[0]["status"] == "ok" and one[0]["id"].startswith("head=linear_tune=false_class_weight=0.5_")
    runs = base / "reports" / "runs"
    assert len([p for p in runs.iterdir() if p.is_dir()]) == 5
    assert len(list((base / "models" / "experiments").iterdir())) == 2  # the linear classifier was reused
    assert one[0]["caches"]["classifier"] == next(r for r in records if r["parameters"] == {
        "classifier.head": "linear", "search.tune": True})["caches"]["classifier"]
    assert "<th>search.class_weight</th>" in (runs / "index.html").read_text()


def test_a_failed_run_is_recorded_and_does_not_stop_the_others(grid):
    project, records, _ = grid
    lines = []
    out = run_experiment(plan(project, ["dataset.min_per_class=1000,5", "classifier.head=linear",
                                        "search.tune=true"]), notebooks=False, echo=lines.append)
    failed, ok = out
    assert failed["status"] == "failed" and "DatasetError" in failed["error"] and "min_per_class" in failed["error"]
    runs = project.parent / "reports" / "runs"
    rec = json.loads((runs / failed["id"] / "run.json").read_text())
    assert rec["status"] == "failed" and rec["finished"] and "Traceback" in (runs / failed["id"] / "error.txt").read_text()
    # the second combination is the grid's (linear, tune=true) run: reused, whatever -p spelled it
    assert ok["status"] == "ok" and ok["id"] in {r["id"] for r in records}
    assert any("FAILED" in ln for ln in lines) and "1 failed" in lines[-1]
    page = (runs / "index.html").read_text()
    assert "failed" in page and "min_per_class" in page and f'{failed["id"]}/error.txt' in page


def test_the_comparison_notebook_reads_the_records(grid, tmp_path):
    import nbformat
    import papermill as pm

    from vslib.paths import NOTEBOOKS_DIR

    project, records, _ = grid
    nb_path = NOTEBOOKS_DIR / experiments.COMPARE_NOTEBOOK
    nb = nbformat.read(str(nb_path), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    out = tmp_path / "06.ipynb"
    pm.execute_notebook(str(nb_path), str(out), parameters={"config_path": str(project.resolve())},
                        cwd=str(NOTEBOOKS_DIR), kernel_name="python3", progress_bar=False)
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/html", ""))
                     for c in nbformat.read(str(out), as_version=4).cells for o in c.get("outputs", []))
    for r in records:
        assert r["id"] in text
    assert "classifier.head" in text


def test_the_cli_validates_and_lists_the_runs(tmp_path, capsys):
    from vslib import cli

    cfg = _write(tmp_path, SMALL)
    assert cli.main(["experiment", "-c", str(cfg), "-p", "classifier.hed=linear", "--no-notebooks"]) == 2
    assert "did you mean 'classifier.head'?" in capsys.readouterr().err
    assert cli.main(["experiment", "-c", str(cfg), "-p", "classifier.head=linear,knn", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out] == [r.id for r in plan(cfg, ["classifier.head=linear,knn"])]
    assert all(ln.endswith("new") for ln in out) and not (tmp_path / "reports" / "runs").exists()
