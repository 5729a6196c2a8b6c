"""``visualsearch`` command line.

Each sub-command is a thin wrapper over one library function, so everything
the CLI does can be done from a notebook too:

========================  ==========================================
``data prepare``          :func:`vslib.datasets.prepare`
``extract``               :func:`vslib.extraction.extract`
``train``                 :func:`vslib.classifier.train`
``index``                 :func:`vslib.index.build`
``evaluate``              :func:`vslib.evaluate.evaluate`
``search IMAGE``          :class:`vslib.search.VisualSearch`
``run``                   :func:`vslib.pipeline.run` (all of the above)
``report``                :func:`vslib.report.run_notebooks`
``experiment``            :func:`vslib.experiments.run_experiment` (a grid of runs)
========================  ==========================================
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback

# Arrow's default allocator (mimalloc) keeps the pages it frees: after reading the manifest of 60,000 images the
# process held ~40 MB more than with the system allocator (issue 17: the client's memory must follow what it
# holds, not the collection). Set before pyarrow is first imported; an ARROW_DEFAULT_MEMORY_POOL given wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from vslib.atomic import strict_json  # noqa: E402
from vslib.config import ConfigError, load_config  # noqa: E402
from vslib.errors import EnvironmentFault, VisualSearchError, environment_fault  # noqa: E402
from vslib.paths import DEFAULT_CONFIG  # noqa: E402
from vslib.registry import BACKENDS, USER_MODES  # noqa: E402

# Each command imports the stage it runs when it runs (the one exception to vslib's imports at the top of a
# module): the library's imports (pandas, scikit-learn, PIL) take ~3 s and ~190 MB here, which `--help`, a
# config error or `data install` should not pay (they answer in ~0.1 s).

log = logging.getLogger("vslib")

EXIT_STATUS = """\
exit status:
  0    done
  1    a bug (a traceback is printed; please report it)
  2    a configuration or data error (the message says what to change)
  3    no space left on the device, or a file size limit reached
  4    a read-only file system
  5    permission denied
  6    a file or folder is missing or vanished while running
  7    too many open files
  8    an input/output error (failing disk, lost mount)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM); handled like Ctrl-C
A fault of the machine (3-8) is one line naming the path, what happened and what to do;
finished work is kept and a rerun resumes. -v shows the traceback too.
"""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``-k 0`` used to mean "the default" silently)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give a whole number >= 1")
    return value


def dumps(obj) -> str:
    """The CLI's JSON: indented, strict (never NaN or Infinity)."""
    return json.dumps(strict_json(obj), indent=2, allow_nan=False)


def _config(args):
    overrides = {}
    if getattr(args, "backend", None):
        overrides["index"] = {"backend": args.backend}
    return load_config(args.config, overrides=overrides or None)


def cmd_prepare(args) -> int:
    from vslib import datasets

    datasets.prepare(_config(args), force=args.force)
    return 0


def cmd_install(args) -> int:
    from vslib import datasets

    datasets.install_system_datasets()
    return 0


def cmd_extract(args) -> int:
    from vslib import extraction

    extraction.extract(_config(args))
    return 0


def cmd_train(args) -> int:
    from vslib import classifier

    classifier.train(_config(args))
    return 0


def cmd_index(args) -> int:
    from vslib import index

    index.build(_config(args), rebuild=args.rebuild)
    return 0


def cmd_evaluate(args) -> int:
    from vslib import evaluate

    # with --json, stdout holds the JSON alone; the table goes to stderr
    echo = (lambda m: print(m, file=sys.stderr)) if args.json else print
    result = evaluate.evaluate(_config(args), seeds=args.seeds, echo=echo)
    if args.json:
        print(dumps(result))
    return 0


def cmd_search(args) -> int:
    from vslib.embedding import QueryImageError
    from vslib.images import not_an_image_file
    from vslib.search import VisualSearch

    cfg = _config(args)
    why = not_an_image_file(args.image)  # before the model loads: a bad path is one line at once, a FIFO never blocks
    if why:
        raise QueryImageError(args.image, why)
    with VisualSearch.from_config(cfg) as engine:
        result = engine.search(args.image, k=cfg.search.k if args.k is None else args.k,
                               mode=args.mode or cfg.search.mode)
    if args.json:
        print(dumps(result.to_json()))
    else:
        print(result.to_text())
    return 0


def cmd_run(args) -> int:
    from vslib import pipeline

    pipeline.run(_config(args), report=args.report)
    return 0


def cmd_report(args) -> int:
    from vslib import report

    report.run_notebooks(_config(args))
    return 0


def cmd_check(args) -> int:
    from vslib import check

    return check.run(_config(args), as_json=args.json, verbose=args.verbose)


def cmd_experiment(args) -> int:
    from vslib import experiments

    runs = experiments.plan(args.config, args.param or [], args.grid)
    if args.dry_run:
        root = experiments.runs_dir(runs[0].config)
        for r in runs:
            old = experiments.read_record(root / r.id)
            state = "new" if old is None else f"{old.get('status')} (finished {old.get('finished')})"
            print(f"{r.id}  {state}")
        return 0
    records = experiments.run_experiment(runs, force=args.force, notebooks=args.notebooks)
    return 0 if all(r.get("status") == "ok" for r in records) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visualsearch", description="Hierarchical reverse image search.",
                                epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, **kw):
        sp = sub.add_parser(name, help=help, description=help, **kw)
        sp.add_argument("-c", "--config", "-yml", default=str(DEFAULT_CONFIG),
                        help="settings file (default: application.yaml)")
        sp.set_defaults(func=func)
        return sp

    data = sub.add_parser("data", help="dataset commands")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser("prepare", help="find, check and split the dataset; write the manifest")
    prep.add_argument("-c", "--config", "-yml", default=str(DEFAULT_CONFIG))
    prep.add_argument("--force", action="store_true", help="re-check every image instead of reusing the manifest")
    prep.set_defaults(func=cmd_prepare)
    inst = dsub.add_parser("install", help="install the Debian dataset packages (Tux Paint stamps, Fashion-MNIST) "
                                           "when missing; needs root")
    inst.set_defaults(func=cmd_install)

    add("extract", cmd_extract, "compute (or reuse cached) feature vectors for every image")
    add("train", cmd_train, "train and calibrate the classifier on the index split")
    sp = add("index", cmd_index, "index the feature vectors of the index split")
    sp.add_argument("--backend", choices=BACKENDS.names(), help="override index.backend")
    sp.add_argument("--rebuild", action="store_true",
                    help="delete the existing index first (needed after changing the backbone)")
    sp = add("evaluate", cmd_evaluate, "precision@k / mAP of every search mode on the query split")
    sp.add_argument("--backend", choices=BACKENDS.names(), help="override index.backend")
    sp.add_argument("--json", action="store_true", help="print the results as JSON")
    sp.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                    help="also repeat split, training, tuning and search in memory on N seeded splits "
                         "(the configured seed and the N-1 following) and report means and pooled gains")
    sp = add("search", cmd_search, "find the images that look like IMAGE")
    sp.add_argument("image", help="query image file")
    sp.add_argument("-k", type=_positive_int, default=None, help="number of hits, >= 1 (default: search.k)")
    sp.add_argument("--mode", choices=USER_MODES, default=None)
    sp.add_argument("--backend", choices=BACKENDS.names(), help="override index.backend")
    sp.add_argument("--json", action="store_true", help="print the result as JSON")
    sp = add("run", cmd_run, "prepare, extract, train, index and evaluate, skipping work already done")
    sp.add_argument("--backend", choices=BACKENDS.names(), help="override index.backend")
    sp.add_argument("--report", action="store_true", help="also run the notebooks into HTML reports")
    sp = add("check", cmd_check, "verify every stored artifact of the config's dataset and backbone (checksums, "
                                 "vectors, index state); list what is damaged and what the next run redoes; "
                                 "exit 2 when anything is damaged")
    sp.add_argument("--json", action="store_true", help="print the findings as JSON")
    add("report", cmd_report, "run the notebooks with papermill and export HTML reports")
    sp = add("experiment", cmd_experiment,
             "run every combination of parameters into reports/runs/<run-id>/ and compare them in "
             "reports/runs/index.html (identical runs are reused)")
    sp.add_argument("-p", "--param", action="append", metavar="SECTION.KEY=VALUE[,VALUE...]",
                    help="a setting for the runs (repeatable); a comma list makes a grid, "
                         "e.g. -p classifier.head=ensemble,linear -p search.tune=true,false; "
                         "-p notebook.NAME=VALUE sets a notebook's own parameter (e.g. notebook.umap_points=500)")
    sp.add_argument("--grid", metavar="FILE", help="YAML grid file: 'section.key: [values]' per line "
                                                   "(-p replaces the file's values of the same key)")
    sp.add_argument("--force", action="store_true", help="rerun runs that already finished")
    sp.add_argument("--notebooks", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the numbered notebooks into each run's folder (default: yes)")
    sp.add_argument("--dry-run", action="store_true", help="list the runs and whether they exist; run nothing")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so the same clean-up runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (called from a notebook's worker): leave signals alone
        pass
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("faiss").setLevel(logging.WARNING)  # "could not load AVX512 ..." probing
        logging.getLogger("elastic_transport").setLevel(logging.ERROR)  # per-request lines; errors say it all
    try:
        return args.func(args)
    except EnvironmentFault as e:
        return _fault(e, args.verbose)
    except (ConfigError, VisualSearchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # from the machine (no space, read-only, ...) unless it is none of those: a bug
        fault = environment_fault(e)
        if fault is None:
            raise
        return _fault(fault, args.verbose, e)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}; finished work is kept in the caches, rerun to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


def _fault(fault, verbose: bool, cause: BaseException | None = None) -> int:
    if verbose:
        traceback.print_exception(cause or fault, file=sys.stderr)
    print(f"error: {fault}", file=sys.stderr)
    return fault.exit_code


if __name__ == "__main__":
    sys.exit(main())
