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

The package in three steps and the files between them: :mod:`~vslib.experiments.plan` (grids, run ids, configs),
:mod:`~vslib.experiments.run` (executing runs, their records), :mod:`~vslib.experiments.compare` (the table, the
figure and the page) and :mod:`~vslib.experiments.records` (the run folder's files, which the other three read).
"""
from vslib.experiments.compare import (COMPARISON_FIGURE, COMPARISON_PAGE, differing_parameters, metric_columns,
                                       metric_value, plot_precision, runs_table, write_comparison)
from vslib.experiments.plan import (COMPARE_NOTEBOOK, FROM_CONFIG, NOTEBOOK_PREFIX, Run, check_notebook_parameters,
                                    combinations, grid_from, load_grid_file, notebook_parameter_names, parse_param,
                                    plan, run_hash, run_id, settings_hash)
from vslib.experiments.records import (METRICS, RECORD, RUN_CONFIG, RUNS_DIR, audit, find_run, load_runs, read_record,
                                       runs_dir)
from vslib.experiments.run import (PACKAGES, STAGES, cache_keys, execute, git_state, materialise, run_experiment,
                                   summarise, versions)

__all__ = ["COMPARE_NOTEBOOK", "COMPARISON_FIGURE", "COMPARISON_PAGE", "FROM_CONFIG", "METRICS", "NOTEBOOK_PREFIX",
           "PACKAGES", "RECORD", "RUNS_DIR", "RUN_CONFIG", "Run", "STAGES", "audit", "cache_keys",
           "check_notebook_parameters", "combinations", "differing_parameters", "execute", "find_run", "git_state",
           "grid_from", "load_grid_file", "load_runs", "materialise", "metric_columns", "metric_value",
           "notebook_parameter_names", "parse_param", "plan", "plot_precision", "read_record", "run_experiment",
           "run_hash", "run_id", "runs_dir", "runs_table", "settings_hash", "summarise", "versions",
           "write_comparison"]
