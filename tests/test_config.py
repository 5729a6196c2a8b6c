"""application.yaml parsing: typed values, and errors that say what to fix."""
import pytest

from vslib.config import ConfigError, Config, load_config, parse_config
from vslib.paths import DEFAULT_CONFIG


def test_shipped_config_is_valid_and_matches_defaults():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.dataset.name == "tuxpaint"
    assert cfg.backbone.name == "efficientnet_lite0"
    assert cfg.index.backend == "embedded"
    # every key in the shipped file restates a default: the file documents the defaults
    assert cfg.to_dict() == parse_config({}).to_dict()


def test_misspelt_key_names_key_place_and_closest():
    with pytest.raises(ConfigError) as e:
        parse_config({"index": {"elasticsearch": {"num_candidate": 50}}}, source="app.yaml")
    msg = str(e.value)
    assert "'num_candidate'" in msg and "index.elasticsearch" in msg and "did you mean 'num_candidates'" in msg
    assert msg.startswith("app.yaml:")


def test_unknown_section_at_top_level():
    with pytest.raises(ConfigError, match=r"unknown key 'datset' in the top level; did you mean 'dataset'"):
        parse_config({"datset": {}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"backbone\.batch_size is 'big'; expected an integer"):
        parse_config({"backbone": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"classifier\.calibrate is 'yes'; expected true or false"):
        parse_config({"classifier": {"calibrate": "yes"}})


def test_out_of_range_names_allowed_values():
    with pytest.raises(ConfigError, match=r"dataset\.split\.query_fraction is 1\.5; allowed values are between 0\.0 and 0\.9"):
        parse_config({"dataset": {"split": {"query_fraction": 1.5}}})
    with pytest.raises(ConfigError, match=r"search\.k is 0; allowed values are between 1 and 10000"):
        parse_config({"search": {"k": 0}})


def test_choice_lists_allowed_values_and_suggests():
    with pytest.raises(ConfigError) as e:
        parse_config({"index": {"backend": "elastic"}})
    assert "index.backend 'elastic' is not allowed; did you mean 'elasticsearch'?" in str(e.value)
    assert "choices: embedded, elasticsearch" in str(e.value)
    with pytest.raises(ConfigError, match=r"evaluation\.modes\[1\] 'hierarchy' is not a mode; did you mean 'hierarchical'"):
        parse_config({"evaluation": {"modes": ["flat", "hierarchy"]}})


def test_cross_field_requirements():
    with pytest.raises(ConfigError, match=r"dataset\.root is required when dataset\.name is 'folder'"):
        parse_config({"dataset": {"name": "folder"}})
    with pytest.raises(ConfigError, match=r"backbone\.weights is required for resnet50: 'imagenet'.*local weights file"):
        parse_config({"backbone": {"name": "resnet50"}})


def test_environment_overrides_connection_secrets_and_never_shows_them():
    env = {"VS_ES_URL": "https://a:9200, https://b:9200", "VS_ES_PASSWORD": "hunter2", "VS_ES_API_KEY": "k3y"}
    cfg = parse_config({"index": {"elasticsearch": {"username": "elastic"}}}, env=env)
    es = cfg.index.elasticsearch
    assert es.hosts == ["https://a:9200", "https://b:9200"]
    assert es.password == "hunter2" and es.api_key == "k3y"
    for text in (repr(cfg), str(cfg.to_dict())):
        assert "hunter2" not in text and "k3y" not in text


def test_relative_paths_resolve_against_config_folder(tmp_path):
    p = tmp_path / "sub" / "app.yaml"
    p.parent.mkdir()
    p.write_text("paths: {data: mydata}\n")
    cfg = load_config(p)
    assert cfg.data_dir == tmp_path / "sub" / "mydata"
    assert cfg.manifest_path == tmp_path / "sub" / "mydata" / "tuxpaint" / "manifest.parquet"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_merge_over_file(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("index: {backend: embedded, embedded: {factory: HNSW32}}\n")
    cfg = load_config(p, overrides={"index": {"backend": "elasticsearch"}})
    assert cfg.index.backend == "elasticsearch" and cfg.index.embedded.factory == "HNSW32"
    # the two merge key by key: every setting neither names keeps its default
    expected = Config().to_dict()
    expected["index"]["backend"] = "elasticsearch"
    expected["index"]["embedded"]["factory"] = "HNSW32"
    assert isinstance(cfg, Config) and cfg.to_dict() == expected
