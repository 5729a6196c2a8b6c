"""Faults of the machine, made for real: a full or read-only file system (tmpfs mounts, as root),
a file size limit (RLIMIT_FSIZE), two runs at once, a lock left by a killed run, a dangling link.

Each CLI run is a real ``python -m vslib.cli`` process on a small folder dataset of
scikit-image pictures; the asserts are on its one-line message, its exit code, the files left
on disk, and that a rerun afterwards holds every vector exactly once.
"""
from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import write_config
from vslib.atomic import atomic_write_json
from vslib.config import load_config
from vslib.errors import EXIT_CODES, EnvironmentFault, environment_fault
from vslib.locks import LOCK_FILE, run_lock

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 24  # 4 classes x 6


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """One models folder for the module, the backbone's weights converted into it once, up front
    (so that no test's size limit or full disk meets that 14 MB write)."""
    models = tmp_path_factory.mktemp("models")
    code = ("from vslib.backbones import get_backbone; "
            f"get_backbone('efficientnet_lite0', cache_dir={str(models / 'backbones')!r}, runtime='keras')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr[-3000:]
    return models


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    pics = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee(), "astronaut": skimage.data.astronaut(),
            "rocket": skimage.data.rocket()}
    for label, pic in pics.items():
        (root / label).mkdir()
        for i in range(N_IMAGES // len(pics)):
            Image.fromarray(pic).resize((90 + 7 * i, 80 + 5 * i)).save(root / label / f"{i}.png")
    return root


def _project(tmp_path: Path, image_root: Path, models_dir: Path, batch_size: int = 4) -> Path:
    """A config in ``tmp_path`` (data and reports there, the shared models folder), manifest prepared."""
    cfg_path = write_config(tmp_path, {
        "dataset": {"name": "folder", "root": str(image_root), "min_per_class": 2},
        "backbone": {"name": "efficientnet_lite0", "batch_size": batch_size, "workers": 2, "runtime": "keras"},
        "paths": {"data": "data", "models": str(models_dir), "reports": "reports"},
    })
    from vslib import datasets

    datasets.prepare(load_config(cfg_path), progress=False, echo=lambda m: None)
    return cfg_path


def _cli(cfg_path: Path, *args: str, preexec=None, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "vslib.cli", *args, "-c", str(cfg_path)], capture_output=True,
                          text=True, timeout=timeout, env=env, preexec_fn=preexec, cwd=ROOT, **popen)


def _computed(stderr: str) -> int:
    m = re.search(r"(\d+) computed, (\d+) reused", stderr)
    assert m, stderr[-3000:]
    return int(m.group(1))


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _check_every_vector_once(cfg_path: Path) -> None:
    from vslib.feature_cache import SHARDS_DIR
    from vslib.features import load_features

    cfg = load_config(cfg_path)
    fs = load_features(cfg)
    assert len(fs) == N_IMAGES and fs.table["content_hash"].nunique() == N_IMAGES
    shards = list((cfg.features_dir / SHARDS_DIR).glob("*.npz"))
    hashes = np.concatenate([np.load(p)["hashes"] for p in shards])
    assert len(hashes) == len(set(hashes)) == N_IMAGES  # compacted: each vector stored once


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*") if ".tmp" in p.name]


@pytest.fixture
def mount_tmpfs():
    """``mount_tmpfs(dir, size, ro=False)``: a real small file system; skipped where mounting is not allowed."""
    mounted = []

    def mount(directory: Path, size: str = "2m", *, ro: bool = False):
        directory.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root); the RLIMIT_FSIZE test covers a full disk")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(directory)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs CAP_SYS_ADMIN")
        mounted.append(directory)
        return directory

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


# ---------------------------------------------------------------------------
# The message


def test_each_fault_names_path_cause_and_remedy_with_its_own_exit_code():
    cases = {errno.ENOSPC: ("no space", 3), errno.EROFS: ("read-only", 4), errno.EACCES: ("permission denied", 5),
             errno.ENOENT: ("does not exist", 6), errno.EMFILE: ("too many open files", 7)}
    for n, (words, code) in cases.items():
        f = environment_fault(OSError(n, os.strerror(n)), "/data/features/x.npz")
        assert isinstance(f, EnvironmentFault) and f.exit_code == code
        assert str(f).startswith("/data/features/x.npz: ") and words in str(f)
        assert "\n" not in str(f)
    assert "paths.*" in str(environment_fault(OSError(errno.ENOSPC, "x"), "/p"))
    assert environment_fault(OSError(errno.EINVAL, "x"), "/p") is None  # not the machine's fault: a bug to show
    assert len(set(EXIT_CODES.values()) & {0, 1, 2, 130}) == 0


def test_help_documents_the_exit_codes():
    from vslib.cli import build_parser

    text = build_parser().format_help()
    for code in sorted(set(EXIT_CODES.values())):
        assert re.search(rf"^\s+{code}\s+\w", text, re.M), text


# ---------------------------------------------------------------------------
# Disk full


def test_disk_full_during_extract_keeps_finished_shards_and_rerun_computes_only_the_rest(
        tmp_path, image_root, models_dir, mount_tmpfs):
    cfg_path = _project(tmp_path, image_root, models_dir)
    cfg = load_config(cfg_path)
    features_root = mount_tmpfs(cfg.features_dir.parent, "2m")
    filler = features_root / "filler"
    with open(filler, "wb") as f:  # fill the file system, then give back room for two or three shards
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, filler.stat().st_size - 64 * 1024)

    r = _cli(cfg_path, "extract")
    assert r.returncode == EXIT_CODES["no-space"], r.stderr[-3000:]
    line = _error_line(r.stderr)
    assert str(cfg.features_dir) in line and "no space left" in line and "paths.*" in line, line
    assert _temp_files(features_root) == []
    shards = list((cfg.features_dir / "shards").glob("*.npz"))
    kept = sum(len(np.load(p)["hashes"]) for p in shards)
    assert 0 < kept < N_IMAGES, kept  # finished batches are kept

    filler.unlink()  # space freed
    r = _cli(cfg_path, "extract")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _computed(r.stderr) == N_IMAGES - kept
    _check_every_vector_once(cfg_path)


def test_file_size_limit_is_a_fault_and_rerun_computes_nothing_twice(tmp_path, image_root, models_dir):
    """RLIMIT_FSIZE (no root needed): the shards of 4 vectors fit, merging them does not."""
    cfg_path = _project(tmp_path, image_root, models_dir)
    cfg = load_config(cfg_path)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    r = _cli(cfg_path, "extract", preexec=limit)
    assert r.returncode == EXIT_CODES["file-too-large"], r.stderr[-3000:]
    line = _error_line(r.stderr)
    assert str(cfg.features_dir) in line and "size" in line, line
    assert _temp_files(cfg.data_dir) == []
    shards = list((cfg.features_dir / "shards").glob("*.npz"))
    assert sum(len(np.load(p)["hashes"]) for p in shards) == N_IMAGES  # every finished batch kept

    r = _cli(cfg_path, "extract")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _computed(r.stderr) == 0
    _check_every_vector_once(cfg_path)


# ---------------------------------------------------------------------------
# Read-only


def test_read_only_features_folder_is_one_line_and_exit_code(tmp_path, image_root, models_dir, mount_tmpfs):
    cfg_path = _project(tmp_path, image_root, models_dir)
    cfg = load_config(cfg_path)
    mount_tmpfs(cfg.features_dir.parent, "1m", ro=True)
    r = _cli(cfg_path, "extract")
    assert r.returncode == EXIT_CODES["read-only"], r.stderr[-3000:]
    line = _error_line(r.stderr)
    assert str(cfg.features_dir) in line and "read-only" in line, line

    r = _cli(cfg_path, "extract", "--help")  # sanity: the CLI itself is fine
    assert r.returncode == 0
    r = subprocess.run([sys.executable, "-m", "vslib.cli", "-v", "extract", "-c", str(cfg_path)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == EXIT_CODES["read-only"] and "Traceback" in r.stderr  # the traceback only with -v


def test_read_only_reports_folder_in_a_notebook_is_a_project_error(tmp_path, mount_tmpfs):
    from vslib.evaluate import RESULTS_JSON

    reports = mount_tmpfs(tmp_path / "reports", "1m", ro=True)
    with pytest.raises(EnvironmentFault, match="read-only") as e:
        atomic_write_json(reports / RESULTS_JSON, {"k": 10})
    assert e.value.path == reports / RESULTS_JSON and e.value.exit_code == EXIT_CODES["read-only"]


# ---------------------------------------------------------------------------
# Two runs at once; a killed run's lock


def test_two_extracts_at_once_compute_each_image_once(tmp_path, image_root, models_dir):
    cfg_path = _project(tmp_path, image_root, models_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "vslib.cli", "extract", "-c", str(cfg_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    # the guarantee: every image computed exactly once between the two runs, whichever started first and
    # whether or not one had to wait (on a loaded machine the second may start after the first has finished)
    computed = [_computed(err) for _, err in outs]
    assert sum(computed) == N_IMAGES, computed
    for p, (_, err) in zip(procs, outs):
        other = [q.pid for q in procs if q is not p][0]
        if "waiting for the run with PID" in err:  # when one waited, it names the other run and what it holds
            assert f"PID {other} " in err and "feature cache" in err, err[-2000:]
    _check_every_vector_once(cfg_path)


def _hold_lock(directory: Path) -> subprocess.Popen:
    code = ("import sys, time; from vslib.locks import run_lock\n"
            f"with run_lock({str(directory)!r}, 'a test lock'):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[1]))")
    return subprocess.Popen([sys.executable, "-c", code, "3"], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_second_run_waits_and_says_for_whom(tmp_path, caplog):
    holder = _hold_lock(tmp_path)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="vslib.locks"), run_lock(tmp_path, "the test cache"):
        waited = time.monotonic() - t0
    holder.wait(timeout=30)
    assert waited > 0.5  # it did wait for the holder
    assert f"waiting for the run with PID {holder.pid} started at" in caplog.text
    assert "that is writing a test lock" in caplog.text


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    holder = _hold_lock(tmp_path)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).exists() and (tmp_path / ".lock.owner").exists()  # left behind
    t0 = time.monotonic()
    with run_lock(tmp_path, "after the crash", timeout=10):
        assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------
# Entries that cannot be opened


def test_dangling_symlink_is_listed_as_skipped(tmp_path, image_root):
    import shutil

    from vslib import datasets

    root = tmp_path / "pictures"
    shutil.copytree(image_root, root)
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(root / "rocket" / "pipe.png")  # would block a reader forever
    cfg = load_config(write_config(tmp_path, {"dataset": {"name": "folder", "root": str(root), "min_per_class": 2}}))
    lines = []
    df = datasets.prepare(cfg, progress=False, echo=lines.append)
    rows = df.set_index("path")
    link = rows.loc[str(root / "cat" / "gone.png")]
    assert link["status"] == "skipped" and "dangling symbolic link" in link["reason"]
    assert str(tmp_path / "nowhere.png") in link["reason"]
    pipe = rows.loc[str((root / "rocket" / "pipe.png").resolve())]
    assert pipe["status"] == "skipped" and "not a regular file" in pipe["reason"]
    assert "gone.png: dangling symbolic link" in "\n".join(lines)
    assert (df["status"] == "ok").sum() == N_IMAGES
