"""The stages of a run and the one runner that orders, times and skips them.

``visualsearch run`` (:func:`vslib.pipeline.run`), a notebook's
:func:`vslib.report.ensure` and each experiment run
(:func:`vslib.experiments.execute`) go through :class:`Runner`, so they run
the same stages in the same order, time them the same way, and agree on when
a stage is already done and when the index is rebuilt (:func:`index_action`).
What differs between them is only how they show it: a header line per stage,
progress bars, where the timings go.

Each stage reuses what an earlier run left behind by its own checks (the
manifest's file checks, the feature cache, a classifier trained on the same
features and settings). Two stages can also be skipped outright when a caller
asks (``skip_done``): ``prepare`` when the manifest exists, and ``index`` when
the index holds as many items as the index split.
"""
from __future__ import annotations

import time
from typing import Callable, Collection, Optional

from vslib import classifier, datasets, evaluate, extraction
from vslib.features import FeatureSet
from vslib import index as index_mod
from vslib.config import Config
from vslib.integrity import DamagedFile

#: the stages of a run, in pipeline order (an entry point may time one more of its own, e.g. the notebooks)
STAGES = ("prepare", "extract", "train", "index", "evaluate")
#: stages :class:`Runner` can skip when their output is already there (``skip_done``)
SKIPPABLE = ("prepare", "index")


def index_count(cfg: Config) -> int:
    """The number of items in the configured index; -1 when it is missing or damaged."""
    try:
        with index_mod.open_index(cfg, create=False) as idx:
            return idx.count()
    except (index_mod.IndexNotFoundError, DamagedFile):  # a damaged index is rebuilt by index.build
        return -1


def index_action(have: int, want: int, *, reuse: bool = True) -> Optional[str]:
    """What the index stage does for an index of ``have`` items (-1: missing or damaged) and a split of ``want``.

    * ``None``: nothing, the index holds the split (only with ``reuse``; without it the items are loaded again,
      replacing themselves, which refreshes vectors whose images or weights changed under the same ids);
    * ``"build"``: :func:`vslib.index.build` into the index: it creates a missing one and rebuilds a damaged one;
    * ``"rebuild"``: a fresh index, whenever an existing one holds another number of items than the split.

    Fewer items are rebuilt too, not topped up: the index folder is keyed by dataset and backbone names only, so
    its items need not be a subset of today's split (another ``max_per_class`` or split seed); adding would leave
    the extra ones, some of them perhaps today's queries. A fresh build ends with exactly the split; an index of
    another dimension (an empty one included) is replaced instead of refused; searches keep the old index until
    the new one is published. The price, for an index that was a subset (an interrupted load), is loading again
    the items it had.
    """
    if have == want and reuse:
        return None
    if have < 0 or have == want:
        return "build"
    return "rebuild"


class Runner:
    """Runs the stages of :data:`STAGES` on ``cfg`` in order, timing each.

    Parameters
    ----------
    cfg : Config
    echo : callable
        Where lines go (stage headers, the stages' own summaries).
    header : str, optional
        A line echoed before each stage, ``{name}`` filled in (``"\\n== {name} =="``); None for none.
    progress : bool
        Progress bars of the dataset check, the extraction and the index load.
    timings : dict, optional
        Filled with ``{stage: seconds}`` as each stage finishes (a failure keeps the finished ones).
    digits : int, optional
        Round the seconds to this many digits.
    skip_done : collection of str
        Stages of :data:`SKIPPABLE` to skip when done: ``prepare`` when the manifest exists, ``index`` when it
        holds as many items as the index split (:func:`index_action`). A skipped stage is still timed.
    """

    def __init__(self, cfg: Config, *, echo: Callable[[str], None] = print, header: Optional[str] = None,
                 progress: bool = True, timings: Optional[dict] = None, digits: Optional[int] = None,
                 skip_done: Collection[str] = ()):
        unknown = sorted(set(skip_done) - set(SKIPPABLE))
        if unknown:
            raise ValueError(f"skip_done={unknown} are not stages that can be skipped (choices: {', '.join(SKIPPABLE)})")
        self.cfg = cfg
        self.echo = echo
        self.header = header
        self.progress = progress
        self.timings = {} if timings is None else timings
        self.digits = digits
        self.skip_done = frozenset(skip_done)

    def stage(self, name: str, fn: Callable[[], object]):
        """Run ``fn`` as stage ``name``: its header, then its seconds into :attr:`timings`; returns what it returns."""
        if self.header is not None:
            self.echo(self.header.format(name=name))
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        self.timings[name] = seconds if self.digits is None else round(seconds, self.digits)
        return out

    def run(self, upto: str = "evaluate", *, prepare_echo: Optional[Callable[[str], None]] = None,
            evaluate_echo: Optional[Callable[[str], None]] = None,
            after: Optional[Callable[[str, object], None]] = None) -> dict:
        """Run the stages up to ``upto``; return ``{stage: output}`` of those run.

        ``prepare_echo`` and ``evaluate_echo`` replace :attr:`echo` for those stages' own lines; ``after(stage,
        output)`` is called as each stage finishes (before the next one's header).
        """
        if upto not in STAGES:
            raise ValueError(f"upto={upto!r} is not a stage (choices: {', '.join(STAGES)})")
        cfg, progress = self.cfg, self.progress
        prepare_echo = self.echo if prepare_echo is None else prepare_echo
        evaluate_echo = self.echo if evaluate_echo is None else evaluate_echo
        out: dict = {}

        def prepare():
            if "prepare" in self.skip_done and cfg.manifest_path.exists():
                return None
            return datasets.prepare(cfg, progress=progress, echo=prepare_echo)

        actions = {
            "prepare": prepare,
            "extract": lambda: extraction.extract(cfg, progress=progress),
            "train": lambda: classifier.train(cfg),
            "index": lambda: self.index(out["extract"]),
            "evaluate": lambda: evaluate.evaluate(cfg, echo=evaluate_echo),
        }
        for name in STAGES[: STAGES.index(upto) + 1]:
            out[name] = self.stage(name, actions[name])
            if after is not None:
                after(name, out[name])
        return out

    def index(self, fs: FeatureSet) -> Optional[dict]:
        """The index stage: load the index split of ``fs`` as :func:`index_action` says; None when it was done."""
        action = index_action(index_count(self.cfg), len(fs.split("index")), reuse="index" in self.skip_done)
        if action is None:
            return None
        return index_mod.build(self.cfg, rebuild=action == "rebuild", progress=self.progress)


__all__ = ["Runner", "SKIPPABLE", "STAGES", "index_action", "index_count"]
