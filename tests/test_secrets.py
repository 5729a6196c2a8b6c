"""Secrets never reach the disk; names are data, never Markdown; run records are checked when read back.

Passwords, API keys, an inline CA certificate and URL credentials are planted in the config file AND in the
``VS_ES_*`` environment variables (each a distinct, unguessable value); ``run``, ``experiment`` and ``report``
run as a user runs them (CLI subprocesses, the embedded backend: no server is needed, the Elasticsearch
settings are still in the config); then no file under ``reports/``, ``data/`` or ``models/`` (binary ones too)
and none of the commands' output holds any of them.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
import yaml
from PIL import Image

from conftest import write_config, write_tux_config
from vslib import experiments
from vslib.config import load_config, parse_config
from vslib.redact import MARKER, redact_config, redact_text, redact_url, secret_env, strip_userinfo

ROOT = Path(__file__).resolve().parents[1]


def _token(what: str) -> str:
    return f"{what}{secrets.token_hex(12)}"


FILE = {"password": _token("filepw"), "api_key": _token("filekey"), "url_pw": _token("fileurlpw"),
        "pem": _token("MIIBfilepem")}
ENV = {"password": _token("envpw"), "api_key": _token("envkey"), "url_pw": _token("envurlpw")}
PEM = f"-----BEGIN CERTIFICATE-----\n{FILE['pem']}\n-----END CERTIFICATE-----\n"
SECRETS = list(FILE.values()) + list(ENV.values())


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VS_ES_")}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", **extra)
    return env


SECRET_ENV = {"VS_ES_PASSWORD": ENV["password"], "VS_ES_API_KEY": ENV["api_key"],
              "VS_ES_URL": f"http://envuser:{ENV['url_pw']}@127.0.0.1:9"}


def _cli(cfg_path: Path, *args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vslib.cli", *args, "-c", str(cfg_path)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _leaks(folder: Path) -> list[str]:
    """``path: secret`` for every file under ``folder`` (links followed) whose bytes hold a planted secret."""
    found = []
    for base, _, names in os.walk(folder, followlinks=True):
        for n in names:
            p = Path(base) / n
            try:
                data = p.read_bytes()
            except OSError:
                continue
            found += [f"{p}: {s}" for s in SECRETS if s.encode() in data]
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secrets")
    return write_tux_config(root, {
        "dataset": {"max_per_class": 6},
        "evaluation": {"max_queries": 16, "grid_queries": 0},
        "index": {"backend": "embedded", "elasticsearch": {
            "hosts": [f"http://fileuser:{FILE['url_pw']}@127.0.0.1:9"], "username": "fileuser",
            "password": FILE["password"], "api_key": FILE["api_key"], "ca_certs": PEM}},
    })


@pytest.fixture(scope="module")
def used(project):
    """``run`` (secrets in the file only), ``experiment`` (a 2-run grid, file and environment) and ``report``."""
    outputs = []
    for args, env in ((("run",), _env()),
                      (("experiment", "-p", "search.tune=true,false", "--no-notebooks"), _env(**SECRET_ENV)),
                      (("report",), _env(**SECRET_ENV))):
        r = _cli(project, *args, env=env)
        assert r.returncode == 0, f"{args}: {r.stderr[-3000:]}"
        outputs.append(r.stdout + r.stderr)
    return project, outputs


def test_no_planted_secret_is_on_disk_after_run_experiment_and_report(used):
    project, outputs = used
    base = project.parent
    runs = list((base / "reports" / "runs").glob("*/run.json"))
    assert len(runs) == 2 and (base / "reports" / "runs" / "index.html").is_file()
    assert (base / "reports" / "index.html").is_file() and (base / "reports" / "evaluation.md").is_file()
    for where in ("reports", "data", "models"):
        assert (base / where).is_dir()
        assert _leaks(base / where) == []
    for out in outputs:
        assert not [s for s in SECRETS if s in out], out[-2000:]


def test_the_run_config_snapshot_says_where_each_secret_comes_from(used):
    project, _ = used
    snap = next((project.parent / "reports" / "runs").glob("*/config.yaml"))
    data = yaml.safe_load(snap.read_text())
    es = data["index"]["elasticsearch"]
    assert es["password"] == f"{MARKER} (set VS_ES_PASSWORD)" and es["api_key"] == f"{MARKER} (set VS_ES_API_KEY)"
    assert es["ca_certs"] == f"{MARKER} (set VS_ES_CA_CERTS)"
    assert es["hosts"] == [f"http://{MARKER}@127.0.0.1:9"] and "VS_ES_URL" in snap.read_text()
    record = json.loads((snap.parent / "run.json").read_text())
    assert record["config"]["index"]["elasticsearch"]["password"] == f"{MARKER} (set VS_ES_PASSWORD)"
    assert (snap.parent / "run.json.sum").is_file() and (snap.parent / "config.yaml.sum").is_file()


def test_a_rerun_from_the_snapshot_takes_its_secrets_from_the_environment_never_the_marker(used, monkeypatch):
    project, _ = used
    snap = next((project.parent / "reports" / "runs").glob("*/config.yaml"))
    for var in SECRET_ENV:
        monkeypatch.delenv(var, raising=False)
    es = load_config(snap).index.elasticsearch
    assert es.password is None and es.api_key is None and es.ca_certs is None  # unset: never sent as the password
    assert es.hosts == ["http://127.0.0.1:9"]
    for var, value in SECRET_ENV.items():
        monkeypatch.setenv(var, value)
    es = load_config(snap).index.elasticsearch
    assert (es.password, es.api_key, es.hosts) == (ENV["password"], ENV["api_key"], [SECRET_ENV["VS_ES_URL"]])
    # the same run: an experiment asked again reuses it (the snapshot's settings hash is the planned one)
    r = _cli(project, "experiment", "-p", "search.tune=true,false", "--dry-run", env=_env(**SECRET_ENV))
    assert r.returncode == 0 and r.stdout.count("ok (finished") == 2, r.stdout + r.stderr


def test_report_notebook_parameters_and_printed_configs_hold_no_secret(used):
    project, _ = used
    cfg = load_config(project)
    from vslib.report import notebook_parameters

    assert not [s for s in SECRETS if s in json.dumps(notebook_parameters(cfg))]
    shown = repr(cfg) + repr(cfg.index.elasticsearch) + json.dumps(cfg.to_dict())
    assert not [s for s in SECRETS if s in shown] and MARKER in shown


def test_a_damaged_run_record_is_one_line_and_the_next_experiment_reruns_it(used, tmp_path):
    project, _ = used
    folder = next((project.parent / "reports" / "runs").glob("*/run.json")).parent
    saved = (folder / "run.json").read_bytes()
    try:
        data = bytearray(saved)
        data[10:14] = b"XXXX"  # garbled at the same size
        (folder / "run.json").write_bytes(bytes(data))
        cfg = load_config(project)
        found = [f for f in experiments.audit(cfg) if f.bad]
        assert [Path(f.path).parent for f in found] == [folder]
        assert experiments.read_record(folder) is None
        r = _cli(project, "experiment", "-p", "search.tune=true,false", "--dry-run", env=_env(**SECRET_ENV))
        assert r.returncode == 0 and "Traceback" not in r.stderr
        assert r.stdout.count("ok (finished") == 1 and f"{folder.name}  new" in r.stdout, r.stdout
        warned = [ln for ln in r.stderr.splitlines() if "run.json" in ln]
        assert warned and all("reruns this run" in ln for ln in warned), r.stderr
    finally:
        (folder / "run.json").write_bytes(saved)
    assert not [f for f in experiments.audit(load_config(project)) if f.bad]
    snap = folder / "config.yaml"
    saved = snap.read_bytes()
    try:
        snap.write_bytes(saved.replace(b"search:", b"sEarch:", 1))  # an edit of the snapshot, same size
        found = [f for f in experiments.audit(load_config(project)) if f.bad]
        assert [f.path for f in found] == [str(snap)] and "reruns this run" in found[0].line()
        assert experiments.read_record(folder) is not None and not experiments.records.snapshot_intact(folder)
    finally:
        snap.write_bytes(saved)


@pytest.mark.parametrize("param", ["index.elasticsearch.password={s},other", "index.elasticsearch.api_key={s}",
                                   "index.elasticsearch.hosts=http://u:{s}@h:9200"])
def test_a_secret_as_an_experiment_parameter_is_refused_in_one_line_without_echoing_it(tmp_path, capsys, param):
    from vslib import cli

    cfg = write_config(tmp_path, {"dataset": {"name": "tuxpaint", "install": False}})
    secret = _token("param")
    assert cli.main(["experiment", "-c", str(cfg), "-p", param.format(s=secret), "--no-notebooks"]) == 2
    out = capsys.readouterr()
    assert secret not in out.out + out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert "experiment parameter" in out.err or "credentials" in out.err
    assert not (tmp_path / "reports").exists()


# ---------------------------------------------------------------------------
# Redaction units


@pytest.mark.parametrize("url", ["http://user:pw-secret@host:notaport", "http://user:pw-secret@[::1", "http://:pw-secret@",
                                 "https://user:pw-secret@host:99999/path?q=1", "pw-secret"])
def test_redacting_a_malformed_url_never_raises_and_still_hides_the_userinfo(url):
    from vslib.index.elasticsearch import redact

    for out in (redact(url), redact_url(url), strip_userinfo(url), redact_text(f"at {url}: refused")):
        assert isinstance(out, str) and ("pw-secret" not in out or "@" not in url)
    assert redact("http://user:pw-secret@host:notaport") == "http://host:notaport"


def test_redact_config_hides_every_secret_and_leaves_the_rest():
    data = {"index": {"backend": "elasticsearch", "elasticsearch": {
        "hosts": ["https://u:p4ss@a:9200", "https://b:9200"], "password": "p", "api_key": "k", "username": "u",
        "ca_certs": "/etc/ca.pem"}}, "search": {"k": 5}}
    out = redact_config(data)
    es = out["index"]["elasticsearch"]
    assert es["hosts"] == [f"https://{MARKER}@a:9200", "https://b:9200"]
    assert es["password"].startswith(MARKER) and es["api_key"].startswith(MARKER) and es["username"] == "u"
    assert es["ca_certs"] == "/etc/ca.pem"  # a path is not a secret; an inline PEM is
    assert out["search"] == {"k": 5} and data["index"]["elasticsearch"]["password"] == "p"  # a copy
    assert redact_text("Authorization: Bearer abcdefgh12345678") == f"Authorization: Bearer {MARKER}"


PLAIN = {"index": {"backend": "elasticsearch", "elasticsearch": {
    "hosts": ["https://u:p4ssw0rd@a:9200"], "username": "u", "password": "pw", "api_key": "key", "ca_certs": PEM}}}


def test_a_redacted_secret_the_environment_does_not_supply_is_named_never_sent(caplog):
    snapshot = redact_config(PLAIN)
    with caplog.at_level("WARNING"):
        es = parse_config(snapshot, source="config.yaml", env={}).index.elasticsearch
    assert (es.password, es.api_key, es.ca_certs, es.hosts) == (None, None, None, ["https://a:9200"])
    for var in ("VS_ES_PASSWORD", "VS_ES_API_KEY", "VS_ES_CA_CERTS", "VS_ES_URL"):
        assert [m for m in caplog.messages if m.startswith("config.yaml: ") and f"set {var} " in m], caplog.messages
    caplog.clear()
    with caplog.at_level("WARNING"):
        parse_config(snapshot, env={"VS_ES_PASSWORD": "a", "VS_ES_API_KEY": "b", "VS_ES_CA_CERTS": "/ca.pem",
                                    "VS_ES_URL": "https://u:c@a:9200"})
        parse_config(redact_config({"index": {**PLAIN["index"], "backend": "embedded"}}), env={})  # not needed
    assert caplog.messages == []


def test_a_child_reading_the_redacted_config_gets_the_secrets_from_its_environment():
    """What a notebook kernel of an experiment run sees: the run's redacted config.yaml + the VS_ES_* it inherits."""
    original = parse_config(PLAIN, env={})
    env = secret_env(original)
    again = parse_config(redact_config(PLAIN), env=env).index.elasticsearch
    es = original.index.elasticsearch
    assert (again.password, again.api_key, again.ca_certs, again.hosts) == (es.password, es.api_key, es.ca_certs,
                                                                            es.hosts)
    assert secret_env(parse_config({}, env={})) == {}


# ---------------------------------------------------------------------------
# Markdown: a class name is data


NAMES = ["<b>x</b>", "pipe|name", "two\nlines", "tick`s & co"]


def test_class_names_with_html_pipes_and_newlines_stay_in_their_markdown_cell(tmp_path):
    # a Tux Paint layout (its own root): a stamp two folders deep is class "<folder>/<folder>", so "<b>x</b>" is one
    root = tmp_path / "stamps"
    pics = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    for name, pic in zip(NAMES, pics):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(pic).resize((90 + 7 * i, 80 + 5 * i)).save(root / name / f"{i}.png")
    cfg_path = write_config(tmp_path, {
        "dataset": {"name": "tuxpaint", "root": str(root), "min_per_class": 2, "install": False},
        "backbone": {"name": "efficientnet_lite0", "batch_size": 8, "workers": 2},
        "evaluation": {"grid_queries": 0},
    })
    r = _cli(cfg_path, "run", env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "reports" / "evaluation.md").read_text(encoding="utf-8")
    assert "<b>" not in md and "&lt;b&gt;x&lt;/b&gt;" in md
    table = md[md.index("| class |"):].splitlines()
    head, rows = table[0], [ln for ln in table[2:] if ln.startswith("|")]
    cells = len(re.split(r"(?<!\\)\|", head))
    assert len(rows) == len(NAMES)  # a newline never splits a row
    assert all(len(re.split(r"(?<!\\)\|", ln)) == cells for ln in rows)  # an escaped pipe never adds a cell
    assert any(r"pipe\|name" in ln for ln in rows) and any("two lines" in ln for ln in rows)
    assert any(r"tick\`s &amp; co" in ln for ln in rows)
    json.loads((tmp_path / "reports" / "evaluation.json").read_text(), parse_constant=_no_constant)  # strict JSON
    r = _cli(cfg_path, "evaluate", "--json", env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout, parse_constant=_no_constant)
    assert set(printed["per_class"][next(iter(printed["per_class"]))]) == set(NAMES)
    # a metric that is NaN or infinite (no queries of a class, say) is written as null and shown as "–"
    from vslib import evaluate

    cfg = load_config(cfg_path)
    res = evaluate.load_results(cfg)
    res["modes"]["flat"]["p@1"], res["per_class"]["flat"]["<b>x</b>"] = float("nan"), float("inf")
    evaluate.write_results(cfg, res)
    back = json.loads((tmp_path / "reports" / "evaluation.json").read_text(), parse_constant=_no_constant)
    assert back["modes"]["flat"]["p@1"] is None and back["per_class"]["flat"]["<b>x</b>"] is None
    md = (tmp_path / "reports" / "evaluation.md").read_text(encoding="utf-8")
    assert not re.search(r"\b(nan|inf)\b", md) and "| flat | – |" in md
    assert "| flat | – |" in evaluate.format_table(back)  # a result read back from disk formats too


def _no_constant(name):
    raise AssertionError(f"not strict JSON: {name}")
