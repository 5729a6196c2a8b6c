"""Typed, validated settings parsed from ``application.yaml``.

Every section of the YAML file maps onto a dataclass below. Parsing is strict:
an unknown key is an error naming the key, where it is, and the closest valid
key; a wrong type or out-of-range value names the key and what is allowed.

>>> cfg = load_config("application.yaml")
>>> cfg.backbone.name
'efficientnet_lite0'
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from vslib.paths import PROJ_ROOT
from vslib.redact import redact_config, redact_es, unredact_config
from vslib.registry import BACKBONES, BACKENDS, DATASETS, HEADS, MODES

#: the settings that decide how adaptive search ranks (fields of :class:`SearchConfig`, tuned together)
ADAPTIVE_SETTINGS = ("mass", "min_confidence", "max_classes", "class_weight")

#: the names each registry declares (:mod:`vslib.registry`) are the values these settings allow
DatasetName = Literal[DATASETS.choices()]
BackboneName = Literal[BACKBONES.choices()]
HeadName = Literal[HEADS.choices()]
BackendName = Literal[BACKENDS.choices()]
ModeName = Literal[MODES.choices()]


class ConfigError(ValueError):
    """A setting in application.yaml is unknown, mistyped or out of range."""


# ---------------------------------------------------------------------------
# Sections. Each field may carry ``metadata`` with ``min``/``max`` bounds and
# a ``help`` string; Literal types list the allowed values.


def _f(default, *, min=None, max=None, help="", secret=False):  # noqa: A002 - mirror dataclasses.field
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"min": min, "max": max, "help": help}, repr=not secret, **kw)


@dataclass
class SplitConfig:
    query_fraction: float = _f(0.2, min=0.0, max=0.9, help="share of each class held out as queries")
    seed: int = _f(42, help="seed of the deterministic split")
    min_query_per_class: int = _f(1, min=0, help="queries per class even for small classes")


@dataclass
class DatasetConfig:
    name: DatasetName = "tuxpaint"
    root: Optional[str] = _f(None, help="folder/caltech101: the images; tuxpaint/fashion-mnist: override the system location")
    min_per_class: int = _f(5, min=1, help="drop classes with fewer usable images")
    max_per_class: Optional[int] = _f(None, min=1, help="cap images per class (deterministic sample)")
    max_image_pixels: int = _f(50_000_000, min=1, help="larger images are skipped as decompression bombs")
    install: bool = _f(True, help="allow `apt-get install` / download when the data is missing")
    split: SplitConfig = _f(SplitConfig)


@dataclass
class BackboneConfig:
    name: BackboneName = "efficientnet_lite0"
    weights: Optional[str] = _f(None, help="resnet50: 'imagenet' or a local .h5/.keras weights file")
    batch_size: int = _f(32, min=1, max=4096)
    workers: int = _f(0, min=0, help="decode threads; 0 = number of CPU cores")
    runtime: Literal["auto", "tflite", "keras"] = _f(
        "auto", help="inference runtime: auto = TensorFlow Lite on CPU, Keras on a GPU; see vslib.runtime")
    precision: Literal["float32", "int8"] = _f(
        "float32", help="int8 = full-integer TensorFlow Lite, calibrated on the collection (~2.5x faster on a CPU); "
                        "see vslib.int8")


@dataclass
class ClassifierConfig:
    head: HeadName = _f(
        "ensemble", help="ensemble | linear | knn (cross-fitted on the whole index split) | mlp (Keras)")
    folds: int = _f(5, min=2, max=20, help="cross-fitting folds for choosing settings and the temperature")
    C: Optional[float] = _f(None, min=1e-6, help="linear/ensemble: inverse regularisation; null = chosen out of fold")
    neighbors: Optional[int] = _f(None, min=1, help="knn/ensemble: votes per query; null = chosen leave-one-out")
    hidden_units: int = _f(0, min=0, help="0 = softmax head only; >0 adds one hidden layer")
    dropout: float = _f(0.2, min=0.0, max=0.95)
    epochs: int = _f(60, min=1)
    batch_size: int = _f(64, min=1)
    learning_rate: float = _f(1e-3, min=0.0)
    weight_decay: float = _f(1e-4, min=0.0)
    validation_fraction: float = _f(0.2, min=0.05, max=0.5)
    seed: int = 42
    calibrate: bool = True
    fine_tune: bool = _f(False, help="fine-tune the top backbone blocks on images (slow on CPU)")
    fine_tune_layers: int = _f(20, min=1)
    fine_tune_epochs: int = _f(3, min=1)


@dataclass
class EmbeddedIndexConfig:
    factory: str = _f("Flat", help="FAISS index factory string: Flat (exact), HNSW32, ...")
    ef_search: int = _f(128, min=1, help="HNSW search breadth")
    ef_construction: int = _f(200, min=8, help="HNSW build breadth (FAISS's own default is 40)")
    nprobe: int = _f(16, min=1, help="IVF lists scanned per query (IVF factories only)")
    rerank: int = _f(0, min=0, max=100_000, help="candidates re-ranked exactly with the float vectors; 0 = off")
    mmap_vectors: bool = _f(True, help="compressed factories: float vectors stay on disk, memory-mapped")


@dataclass
class ElasticsearchConfig:
    hosts: list[str] = _f(lambda: ["http://localhost:9200"], help="node URLs; env VS_ES_URL overrides")
    index_name: str = _f("visualsearch-{dataset}-{backbone}",
                         help="alias searched; {dataset}/{backbone} are filled in; concrete indexes are <alias>-<time>")
    api_key: Optional[str] = _f(None, help="env VS_ES_API_KEY overrides; never logged", secret=True)
    username: Optional[str] = _f(None, help="env VS_ES_USERNAME overrides")
    password: Optional[str] = _f(None, help="env VS_ES_PASSWORD overrides; never logged", secret=True)
    ca_certs: Optional[str] = None
    verify_certs: bool = True
    similarity: Literal["dot_product", "cosine"] = "dot_product"
    index_options: dict = _f(lambda: {"type": "hnsw", "m": 16, "ef_construction": 100})
    num_candidates: int = _f(100, min=1, max=10000)
    rescore_oversample: Optional[float] = _f(None, min=1.0, max=10.0,
                                             help="knn rescore_vector.oversample for quantized index_options (8.18+)")
    exact: bool = _f(False, help="script_score exact search instead of approximate knn")
    request_timeout: float = _f(10.0, min=0.1, help="seconds: the connection check and index administration")
    search_timeout: float = _f(30.0, min=0.1, help="seconds one search (or one _msearch batch) may take")
    bulk_timeout: float = _f(120.0, min=1.0, help="seconds one bulk chunk may take")
    chunk_size: int = _f(500, min=1)
    msearch_batch: int = _f(100, min=1, max=10000, help="searches sent in one _msearch request")
    store_vectors_in_source: bool = False

    def __repr__(self) -> str:  # never shows a secret (a notebook cell that displays the config writes it into a report)
        shown = redact_es({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return "ElasticsearchConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


@dataclass
class IndexConfig:
    backend: BackendName = "embedded"
    embedded: EmbeddedIndexConfig = _f(EmbeddedIndexConfig)
    elasticsearch: ElasticsearchConfig = _f(ElasticsearchConfig)


@dataclass
class SearchConfig:
    k: int = _f(10, min=1, max=10000)
    mode: ModeName = "adaptive"
    mass: float = _f(0.9, min=0.0, max=1.0, help="adaptive: probability mass of the classes searched")
    min_confidence: float = _f(0.2, min=0.0, max=1.0, help="adaptive: below this top probability, search flat")
    max_classes: int = _f(5, min=1, help="adaptive: at most this many classes")
    class_weight: float = _f(0.2, min=0.0, help="adaptive: hits rank by similarity + class_weight * log(class probability)")
    tune: bool = _f(True, help="adaptive: choose mass, min_confidence, max_classes and class_weight on the "
                              "index split when training (the values above are then only the fallback)")


@dataclass
class EvaluationConfig:
    ks: list[int] = _f(lambda: [1, 5, 10])
    modes: list[str] = _f(lambda: list(MODES))
    max_queries: Optional[int] = _f(None, min=1)
    grid_queries: int = _f(6, min=0, help="queries drawn in the result-grid figures")


@dataclass
class DaskConfig:
    address: Optional[str] = _f(None, help="null = start a LocalCluster on this machine; "
                                           "tcp://host:8786 = connect to a running scheduler")
    workers: int = _f(0, min=0, help="LocalCluster: worker processes; 0 = CPU cores // threads_per_worker")
    threads_per_worker: int = _f(1, min=1, help="LocalCluster: threads per worker (TensorFlow uses as many)")
    partition_size: int = _f(256, min=1, max=100_000, help="images per task (one partition = one shard)")
    dashboard_address: str = _f(":8787", help="LocalCluster: where its dashboard listens (':0' = any free port)")


@dataclass
class ComputeConfig:
    scheduler: Literal["local", "dask"] = _f("local", help="local = in this process; dask = on a Dask cluster")
    dask: DaskConfig = _f(DaskConfig)


@dataclass
class PathsConfig:
    data: str = "data"
    models: str = "models"
    reports: str = "reports"


@dataclass
class Config:
    dataset: DatasetConfig = _f(DatasetConfig)
    backbone: BackboneConfig = _f(BackboneConfig)
    classifier: ClassifierConfig = _f(ClassifierConfig)
    index: IndexConfig = _f(IndexConfig)
    search: SearchConfig = _f(SearchConfig)
    evaluation: EvaluationConfig = _f(EvaluationConfig)
    compute: ComputeConfig = _f(ComputeConfig)
    paths: PathsConfig = _f(PathsConfig)
    #: directory relative paths are resolved against (the config file's folder)
    base_dir: Path = field(default=PROJ_ROOT, repr=False, compare=False)
    source: str = field(default="application.yaml", repr=False, compare=False)

    # -- where things live --------------------------------------------------
    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def data_dir(self) -> Path:
        return self.path(self.paths.data)

    @property
    def models_dir(self) -> Path:
        return self.path(self.paths.models)

    @property
    def reports_dir(self) -> Path:
        return self.path(self.paths.reports)

    @property
    def figures_dir(self) -> Path:
        return self.reports_dir / "figures"

    @property
    def dataset_dir(self) -> Path:
        """Working folder of the configured dataset (manifest, converted images)."""
        return self.data_dir / self.dataset.name

    @property
    def manifest_path(self) -> Path:
        return self.dataset_dir / "manifest.parquet"

    @property
    def backbone_tag(self) -> str:
        """The backbone and its precision as folder and index names carry them: ``efficientnet_lite0``,
        ``efficientnet_lite0-int8``; float32 and int8 vectors never share a cache, a classifier or an index."""
        b = self.backbone
        return b.name if b.precision == "float32" else f"{b.name}-{b.precision}"

    @property
    def features_dir(self) -> Path:
        """Feature cache of the configured backbone (vectors are keyed by image content, so datasets share it)."""
        return self.data_dir / "features" / self.backbone_tag

    @property
    def classifier_dir(self) -> Path:
        return self.models_dir / f"classifier-{self.dataset.name}-{self.backbone_tag}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index" / f"{self.dataset.name}-{self.backbone_tag}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("base_dir"), d.pop("source")
        return redact_config(d)  # secrets become markers naming the VS_ES_* variable that supplies them


# ---------------------------------------------------------------------------
# Parsing


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp, where: str, source: str):
    """Check ``value`` against type ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{source}: {where} is {value!r}; expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping of settings, not {value!r}")
        return _build(tp, value, where, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{source}: {where} {value!r} is not allowed{hint} (choices: {', '.join(map(str, allowed))})"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _convert(value, a, where, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is str:
            value = [value]
        if not isinstance(value, list):
            raise bad
        return [_convert(v, inner, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # YAML's .inf / .nan: no setting means infinity, and JSON cannot hold them
            raise ConfigError(f"{source}: {where} is {value!r}; it must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not in the YAML


def _build(cls, data: dict, where: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in ("base_dir", "source")}
    kwargs = {}
    for key, value in data.items():
        place = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            section = f"section '{where}'" if where else "the top level"
            raise ConfigError(
                f"{source}: unknown key {key!r} in {section}{hint} (valid keys: {', '.join(fields)})"
            )
        f = fields[key]
        v = _convert(value, hints[key], place, source)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (
                    f">= {lo}" if lo is not None else f"<= {hi}")
                raise ConfigError(f"{source}: {place} is {v!r}; allowed values are {rng}")
        kwargs[key] = v
    return cls(**kwargs)


_ENV_OVERRIDES = {
    "VS_ES_URL": ("hosts", lambda s: [h.strip() for h in s.split(",") if h.strip()]),
    "VS_ES_API_KEY": ("api_key", str),
    "VS_ES_USERNAME": ("username", str),
    "VS_ES_PASSWORD": ("password", str),
    "VS_ES_CA_CERTS": ("ca_certs", str),
}


def parse_config(data: Optional[dict], *, source: str = "<dict>", base_dir: Optional[Path] = None,
                 env: Optional[dict] = None) -> Config:
    """Build a :class:`Config` from a mapping (the parsed YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, not {type(data).__name__}")
    data = unredact_config(data, env=env, source=source)  # a redacted snapshot: its secrets come from VS_ES_*
    cfg = _build(Config, data, "", source)
    cfg.source = source
    cfg.base_dir = Path(base_dir) if base_dir is not None else PROJ_ROOT
    _validate(cfg, source)
    env = os.environ if env is None else env
    for var, (attr, conv) in _ENV_OVERRIDES.items():
        if env.get(var):
            setattr(cfg.index.elasticsearch, attr, conv(env[var]))
    return cfg


#: a Dask scheduler address: [protocol://]host:port
_DASK_ADDRESS = re.compile(r"^((tcp|tls|ucx|ws|wss)://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")


def _validate(cfg: Config, source: str) -> None:
    """Cross-field checks that a single type cannot express."""
    for i, m in enumerate(cfg.evaluation.modes):
        if m not in MODES:
            close = difflib.get_close_matches(m, MODES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: evaluation.modes[{i}] {m!r} is not a mode{hint} "
                              f"(choices: {', '.join(MODES)})")
    for i, k in enumerate(cfg.evaluation.ks):
        if k < 1:
            raise ConfigError(f"{source}: evaluation.ks[{i}] is {k}; allowed values are >= 1")
    if DATASETS[cfg.dataset.name]["needs_root"] and not cfg.dataset.root:
        raise ConfigError(f"{source}: dataset.root is required when dataset.name is {cfg.dataset.name!r} "
                          "(the folder that holds the images)")
    if not BACKBONES[cfg.backbone.name]["weights_package"] and not cfg.backbone.weights:
        raise ConfigError(f"{source}: backbone.weights is required for {cfg.backbone.name}: 'imagenet' (downloads "
                          "the weights; needs internet) or the path of a local weights file")
    if cfg.backbone.precision == "int8" and cfg.backbone.runtime == "keras":
        raise ConfigError(f"{source}: backbone.precision int8 runs on TensorFlow Lite, but backbone.runtime is "
                          "keras; set backbone.runtime to auto (or tflite), or backbone.precision to float32")
    if cfg.backbone.precision == "int8" and cfg.classifier.fine_tune:
        raise ConfigError(f"{source}: classifier.fine_tune trains the float32 network, whose vectors would not match "
                          "an int8 index; set backbone.precision: float32 to fine-tune")
    for key in ("data", "models", "reports"):
        where = cfg.path(getattr(cfg.paths, key))
        if where.exists() and not where.is_dir():
            raise ConfigError(f"{source}: paths.{key} is {str(where)!r}, which is a file, not a folder; point it at "
                              "a folder (it is created when missing)")
    template = cfg.index.elasticsearch.index_name
    try:
        template.format(dataset="d", backbone="b")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{source}: index.elasticsearch.index_name {template!r} is not a valid name template "
                          f"({e!r}); use only the placeholders {{dataset}} and {{backbone}}") from None
    address = cfg.compute.dask.address
    if address is not None and not _DASK_ADDRESS.match(address):
        raise ConfigError(f"{source}: compute.dask.address {address!r} is not a scheduler address; use "
                          "tcp://host:8786 (or tls://, ucx://, or host:port), or null to start a LocalCluster")
    opts = cfg.index.elasticsearch.index_options
    if opts.get("type") not in ("hnsw", "int8_hnsw", "int4_hnsw", "bbq_hnsw", "flat", "int8_flat", "int4_flat", "bbq_flat"):
        raise ConfigError(f"{source}: index.elasticsearch.index_options.type {opts.get('type')!r} is not "
                          "allowed (choices: hnsw, int8_hnsw, int4_hnsw, bbq_hnsw, flat, int8_flat, int4_flat, bbq_flat)")


def load_config(path: str | os.PathLike = "application.yaml", overrides: Optional[dict] = None) -> Config:
    """Read and validate a YAML config file.

    Relative paths inside it are resolved against the file's folder.
    ``overrides`` is a nested mapping merged over the file's contents.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist (copy application.yaml from the project root)")
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a folder; give the settings file inside it "
                          f"(e.g. {str(p / 'application.yaml')!r})")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a regular file (a pipe or a device); give a YAML file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if overrides:
        data = merge(data, overrides)
    return parse_config(data, source=p.name, base_dir=p.resolve().parent)


def merge(base: dict, over: dict) -> dict:
    """Recursively merge mapping ``over`` into a copy of ``base``."""
    out = dict(base or {})
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), (dict, type(None))) else v
    return out


# ---------------------------------------------------------------------------
# ``section.key=value`` overrides (the CLI's and papermill's ``-p``)


def parse_value(text: str) -> Any:
    """A ``-p`` value as YAML reads it (``true``, ``0.9``, ``null``, ``[1, 5]``); anything else stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, datetime.date) else value  # 2026-01-02 is a name here, not a date


def nested(key: str, value: Any) -> dict:
    """``nested("search.mass", 0.8)`` -> ``{"search": {"mass": 0.8}}``."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"{key!r} is not a setting name; write section.key, e.g. search.mass")
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def apply_overrides(data: Optional[dict], overrides: dict, *, source: str = "application.yaml",
                    base_dir: Optional[Path] = None) -> Config:
    """Validate ``{"section.key": value}`` overrides one by one over ``data`` (the parsed YAML); return the Config.

    Each override is checked on its own first, so an error names the ``-p``
    that caused it, with the same messages as a YAML key (a misspelt name
    suggests the closest valid one, a bad value lists what is allowed).
    """
    data = dict(data or {})
    merged = data
    for key, value in overrides.items():
        over = nested(key, value)
        where = f"{source} with -p {key}={value if not isinstance(value, bool) else str(value).lower()}"
        leaf = _leaf_type(key, where)
        if dataclasses.is_dataclass(leaf):
            raise ConfigError(f"{where}: {key} is a section, not a setting; name one of its keys "
                              f"({', '.join(f.name for f in dataclasses.fields(leaf))})")
        parse_config(merge(data, over), source=where, base_dir=base_dir, env={})
        merged = merge(merged, over)
    return parse_config(merged, source=source, base_dir=base_dir)


def _leaf_type(key: str, where: str):
    """The declared type of a dotted setting name; an unknown part names the closest valid one."""
    tp: Any = Config
    done = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None  # inside a free-form mapping (index_options): the parser checks the rest
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init and f.name not in ("base_dir", "source")}
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(done + [close[0]])!r}?" if close else ""
            section = f"section '{'.'.join(done)}'" if done else "the top level"
            raise ConfigError(f"{where}: unknown key {part!r} in {section}{hint} "
                              f"(valid keys: {', '.join(fields)})")
        tp = typing.get_type_hints(tp)[part]
        done.append(part)
    return tp
