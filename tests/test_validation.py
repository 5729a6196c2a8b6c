"""Every argument and value checked at the edge (issue 23): one line naming it, exit 2, never a traceback;
SIGTERM handled like Ctrl-C; URL redaction never raises (secrets planted in a whole run: test_secrets.py)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tux_config, write_tux_config

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
ENV.pop("VS_ES_URL", None)


def _cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "vslib.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT, timeout=timeout)


def _one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("args")
    (d / "not-utf8.yaml").write_bytes(b"search:\n  k: 5 # \xff\xfe\n")
    (d / "inf.yaml").write_text("search:\n  class_weight: .inf\n")
    (d / "nan.yaml").write_text("search:\n  mass: .nan\n")
    (d / "cfgdir").mkdir()
    os.mkfifo(d / "fifo")
    os.symlink(d / "loop-b", d / "loop-a")
    os.symlink(d / "loop-a", d / "loop-b")
    (d / "afile").write_text("x")
    (d / "pf.yaml").write_text(f"paths: {{data: {d / 'afile'}}}\n")
    return d


def test_bad_numbers_of_hits_and_seeds(files):
    _one_line_error(_cli("search", "x.png", "-k", "0"), "-k", "0", ">= 1")
    _one_line_error(_cli("search", "x.png", "-k", "-3"), "-k", "-3", ">= 1")
    _one_line_error(_cli("evaluate", "--seeds", "-2"), "--seeds", "-2", ">= 1")


def test_bad_config_files(files):
    _one_line_error(_cli("search", "x.png", "-c", files / "cfgdir"), "cfgdir", "is a folder")
    _one_line_error(_cli("search", "x.png", "-c", files / "not-utf8.yaml"), "not-utf8.yaml", "not UTF-8")
    _one_line_error(_cli("search", "x.png", "-c", files / "missing.yaml"), "missing.yaml", "does not exist")
    _one_line_error(_cli("search", "x.png", "-c", files / "inf.yaml"), "search.class_weight", "finite")
    _one_line_error(_cli("search", "x.png", "-c", files / "nan.yaml"), "search.mass", "finite")
    _one_line_error(_cli("data", "prepare", "-c", files / "pf.yaml"), "paths.data", "a file, not a folder")


@pytest.mark.parametrize("name, words", [("fifo", "named pipe"), ("loop-a", "loop of symbolic links"),
                                         ("cfgdir", "a folder"), ("missing.png", "file not found")])
def test_query_paths_that_are_not_image_files(files, name, words):
    last = _one_line_error(_cli("search", files / name, "-c", ROOT / "application.yaml", timeout=60), words)
    assert str(files / name) in last


def test_a_device_as_the_query():
    _one_line_error(_cli("search", "/dev/null", "-c", ROOT / "application.yaml", timeout=60), "/dev/null", "device")


def test_sigterm_during_extract_keeps_the_work_and_says_so(tmp_path):
    cfg = tux_config(tmp_path, dataset={"max_per_class": 10}, backbone={"batch_size": 8})
    cfg_path = Path(cfg.base_dir) / cfg.source
    assert _cli("data", "prepare", "-c", cfg_path).returncode == 0
    child = subprocess.Popen([sys.executable, "-m", "vslib.cli", "extract", "-c", str(cfg_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, start_new_session=True)
    shards = Path(cfg.features_dir) / "shards"
    deadline = time.monotonic() + 600
    while not any(shards.glob("*.npz")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the first batch is on disk: then it is computing
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("extract finished before SIGTERM arrived (a very fast machine)")
    assert child.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "terminated (SIGTERM); finished work is kept" in err.strip().splitlines()[-1]
    again = _cli("extract", "-c", cfg_path)
    assert again.returncode == 0, again.stderr[-2000:]
    first = sum(int(n) for n in re.findall(r"(\d+) computed", err))  # 0: killed before its summary line
    m = re.search(r"(\d+) images, (\d+) computed, (\d+) reused", again.stderr)
    assert m and int(m.group(3)) > 0 and int(m.group(2)) + int(m.group(3)) == int(m.group(1)) and first == 0


# -- redaction helpers ---------------------------------------------------------------------------------------

def test_url_redaction_never_raises():
    from vslib.index.elasticsearch import redact
    from vslib.redact import redact_text, redact_url

    assert redact("http://user:pw@host:notaport") == "http://host:notaport"
    assert redact_url("http://user:pw@host:notaport/x") == "http://REDACTED@host:notaport/x"
    assert "s3cret" not in redact_text("GET http://a:s3cret@h:9200 Authorization: Bearer abcdefghijkl")
    assert "abcdefghijkl" not in redact_text("Authorization: Bearer abcdefghijkl")


def test_markdown_cells_are_escaped():
    from vslib.evaluate import md_cell

    cell = md_cell("<b>x</b> | a\nb")
    assert "<b>" not in cell and "\n" not in cell and "\\|" in cell
