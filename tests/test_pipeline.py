"""The one stage runner (vslib.stages): every entry point goes through it, and its rule for rebuilding the index.

``visualsearch run`` (pipeline.run), a notebook's report.ensure and an experiment run (experiments.execute) must
not each decide again when a stage is done or when the index is rebuilt; the rule itself is checked on a table of
cases and on a real small Tux Paint index (missing, damaged, the same count, fewer and more items of another split).
"""
from __future__ import annotations

import shutil

import pytest

from conftest import tux_config
from vslib import datasets, experiments, extraction, pipeline, report, stages
from vslib import index as index_mod
from vslib.index.embedded import EmbeddedIndex


class _Reached(Exception):
    pass


@pytest.fixture
def reached(monkeypatch):
    """Runner.run replaced by one that records how it was set up and stops there."""
    calls = []

    def fake_run(self, upto="evaluate", **kwargs):
        calls.append({"upto": upto, "header": self.header, "progress": self.progress, "digits": self.digits,
                      "skip_done": set(self.skip_done)})
        raise _Reached

    monkeypatch.setattr(stages.Runner, "run", fake_run)
    return calls


@pytest.mark.parametrize("entry, expected", [
    (lambda cfg: pipeline.run(cfg, echo=lambda m: None),
     {"upto": "evaluate", "header": "\n== {name} ==", "progress": True, "digits": None, "skip_done": set()}),
    (lambda cfg: report.ensure(cfg, "train", echo=lambda m: None),
     {"upto": "train", "header": None, "progress": False, "digits": None, "skip_done": {"prepare", "index"}}),
    (lambda cfg: experiments.execute(cfg, notebooks=False, echo=lambda m: None),
     {"upto": "evaluate", "header": "-- {name}", "progress": False, "digits": 3, "skip_done": {"index"}}),
], ids=["run", "report.ensure", "experiments.execute"])
def test_each_entry_point_goes_through_the_one_runner(tmp_path, reached, entry, expected):
    with pytest.raises(_Reached):
        entry(tux_config(tmp_path))
    assert reached == [expected]


def test_ensure_refuses_a_stage_it_does_not_know(tmp_path):
    with pytest.raises(ValueError, match="is not a stage"):
        report.ensure(tux_config(tmp_path), "evaluate")
    with pytest.raises(ValueError, match="not stages that can be skipped"):
        stages.Runner(tux_config(tmp_path), skip_done=("train",))


@pytest.mark.parametrize("have, want, reuse, action", [
    (10, 10, True, None),          # the same count: done
    (10, 10, False, "build"),      # ... or loaded again in place (`visualsearch run`)
    (-1, 10, True, "build"),       # missing or damaged: build creates it / rebuilds the damaged one
    (-1, 0, True, "build"),
    (0, 0, True, None),
    (0, 10, True, "rebuild"),      # an existing index of another count, even an empty one: fresh
    (4, 10, True, "rebuild"),      # fewer: need not be a subset of the split
    (4, 10, False, "rebuild"),
    (16, 10, True, "rebuild"),     # more: items of an earlier split are left over
    (16, 10, False, "rebuild"),
])
def test_the_rebuild_rule(have, want, reuse, action):
    assert stages.index_action(have, want, reuse=reuse) == action


def _ids(cfg) -> set:
    with EmbeddedIndex.from_config(cfg, create=False) as idx:
        return set(idx._pos)


@pytest.mark.slow  # four small Tux Paint preparations and extractions: about two minutes on a busy machine
def test_the_index_stage_on_a_real_index(tmp_path, monkeypatch):
    """Missing, the same count, fewer and more items of another split, damaged: the index ends as the split."""
    a = tux_config(tmp_path, dataset={"max_per_class": 3, "min_per_class": 3})
    b = tux_config(tmp_path, dataset={"max_per_class": 5, "min_per_class": 3, "split": {"seed": 7}})  # the same index folder
    assert a.index_dir == b.index_dir

    def features_of(cfg):
        datasets.prepare(cfg, progress=False, echo=lambda m: None)
        fs = extraction.extract(cfg, progress=False)
        return fs, set(index_mod.item_ids(fs.split("index").table))

    builds = []
    real_build = index_mod.build
    monkeypatch.setattr(index_mod, "build", lambda cfg, **kw: builds.append(kw["rebuild"]) or real_build(cfg, **kw))

    def index_stage(cfg, fs, reuse=True):
        builds.clear()
        return stages.Runner(cfg, progress=False, skip_done=("index",) if reuse else ()).index(fs), list(builds)

    fs_a, ids_a = features_of(a)
    assert stages.index_count(a) == -1
    assert index_stage(a, fs_a)[1] == [False]                      # missing: built
    assert _ids(a) == ids_a
    assert index_stage(a, fs_a) == (None, [])                      # the same count: left alone
    assert index_stage(a, fs_a, reuse=False)[1] == [False]         # `run` loads it again in place
    assert _ids(a) == ids_a

    fs_b, ids_b = features_of(b)
    assert len(ids_a) < len(ids_b) and ids_a - ids_b              # fewer, and not a subset of b's split
    assert index_stage(b, fs_b)[1] == [True]
    assert _ids(b) == ids_b                                        # topping up would have kept a's extra items

    fs_a, _ = features_of(a)                                       # more than a's split
    assert index_stage(a, fs_a)[1] == [True]
    assert _ids(a) == ids_a

    shutil.rmtree(a.index_dir)                                     # deleted
    assert index_stage(a, fs_a)[1] == [False]
    assert _ids(a) == ids_a

    meta = next(a.index_dir.rglob("meta.json"))                    # damaged
    meta.write_text("{garbled")
    assert stages.index_count(a) == -1
    assert index_stage(a, fs_a)[1] == [False]                      # index.build rebuilds a damaged one
    assert stages.index_count(a) == len(ids_a) and _ids(a) == ids_a
