"""One registry per kind (vslib.registry): the config, the CLI, the explorer and the README read the same names."""
from __future__ import annotations

import ast
import dataclasses
import itertools
import re
import typing
from pathlib import Path

import pytest

from vslib import registry
from vslib.config import Config, ConfigError, IndexConfig, _leaf_type, parse_config
from vslib.registry import BACKBONES, BACKENDS, DATASETS, HEADS, MODES, REGISTRIES, USER_MODES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting", list(REGISTRIES))
def test_the_config_allows_exactly_the_registered_names(setting):
    assert typing.get_args(_leaf_type(setting, "test")) == REGISTRIES[setting].choices()


def test_an_unregistered_name_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"dataset.name 'tuxpain' is not allowed; did you mean 'tuxpaint'\? "
                                          r"\(choices: tuxpaint, folder, fashion-mnist, caltech101\)"):
        parse_config({"dataset": {"name": "tuxpain"}})


def test_evaluation_modes_default_to_every_mode_and_refuse_others():
    assert Config().evaluation.modes == list(MODES) == ["flat", "hierarchical", "adaptive", "oracle"]
    with pytest.raises(ConfigError, match=r"evaluation.modes\[1\] 'adaptiv' is not a mode; did you mean 'adaptive'"):
        parse_config({"evaluation": {"modes": ["flat", "adaptiv"]}})


def test_capabilities_drive_the_cross_field_checks():
    for name in DATASETS.names(needs_root=True):
        with pytest.raises(ConfigError, match=f"dataset.root is required when dataset.name is '{name}'"):
            parse_config({"dataset": {"name": name}})
    for name in DATASETS.names(needs_root=False):
        parse_config({"dataset": {"name": name}})
    for name in BACKBONES.names(weights_package=None):
        with pytest.raises(ConfigError, match=f"backbone.weights is required for {name}"):
            parse_config({"backbone": {"name": name}})


def test_each_backend_has_its_settings_section_and_class():
    from vslib.index.base import VectorIndex

    hints = typing.get_type_hints(IndexConfig)
    sections = [f.name for f in dataclasses.fields(IndexConfig) if f.name != "backend"]
    assert sections == list(BACKENDS)
    for name in BACKENDS:
        assert hints[name] is BACKENDS.resolve(name, "config_cls")
        assert issubclass(BACKENDS.resolve(name), VectorIndex)


def test_every_reference_resolves():
    from vslib.datasets import Dataset
    from vslib.heads.base import HeadMixin

    for name in DATASETS:
        assert issubclass(DATASETS.resolve(name), Dataset)
    for name in BACKBONES:
        assert callable(BACKBONES.resolve(name, "load"))
    for name in HEADS:
        assert issubclass(HEADS.resolve(name), HeadMixin) and HEADS.resolve(name).kind == name


@pytest.mark.parametrize("reg, error", [(DATASETS, "Unsupported dataset 'x'. Available datasets are "
                                                  "['tuxpaint', 'folder', 'fashion-mnist', 'caltech101']"),
                                        (BACKENDS, "Unsupported backend 'x'. Available backends are "
                                                   "['elasticsearch', 'embedded']"),
                                        (BACKBONES, "Unsupported backbone 'x'. Available backbones are "
                                                    "['efficientnet_lite0', 'efficientnet_lite2', 'resnet50']")])
def test_an_unknown_name_is_one_line_listing_the_available_ones(reg, error):
    with pytest.raises(reg.error) as e:
        reg.spec("x")
    assert str(e.value) == error


def test_the_cli_offers_the_registered_choices():
    from vslib.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("index", "evaluate", "search", "run"):
        backend = next(a for a in sub[command]._actions if a.dest == "backend")
        assert list(backend.choices) == list(BACKENDS)
    mode = next(a for a in sub["search"]._actions if a.dest == "mode")
    assert list(mode.choices) == list(USER_MODES) == ["flat", "hierarchical", "adaptive"]


def test_the_explorer_offers_the_user_modes():
    from vslib.explorer import VIEW_MODES

    assert VIEW_MODES == ("compare",) + USER_MODES


def _readme_names(heading: str) -> list[str]:
    """The names in the first column of the first table under ``heading`` (settings like ``fine_tune: true`` left out)."""
    lines = (REPO / "README.md").read_text().split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))[2:]  # past the header
    cells = [re.match(r"\| `([^`]+)`( \(default\))? \|", row) for row in table]
    return [m[1] + (m[2] or "") for m in cells if m and ":" not in m[1]]


@pytest.mark.parametrize("heading, setting", [("### Datasets (`dataset.name`)", "dataset.name"),
                                              ("### Backbones and features (`backbone.name`)", "backbone.name"),
                                              ("### Classifier heads (`classifier.head`)", "classifier.head"),
                                              ("### Search modes", "search.mode")])
def test_the_readme_tables_list_the_registered_names(heading, setting):
    names = _readme_names(heading)
    assert [n.removesuffix(" (default)") for n in names] == list(REGISTRIES[setting].choices()), (heading, names)
    section, key = setting.split(".")
    default = next(f for f in dataclasses.fields(type(getattr(Config(), section))) if f.name == key).default
    assert all(n == f"{default} (default)" for n in names if n.endswith("(default)")), names


def test_the_registry_sits_at_the_ground_of_the_import_graph():
    """It imports nothing of vslib's but the errors, so vslib.config may read it."""
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("vslib")} == {"vslib.errors"}
