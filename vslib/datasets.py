"""Datasets: find the images, check every one, split them, write the manifest.

A dataset is a list of ``(path, label)`` pairs. :func:`prepare` checks each
file with the robust loader, records what it found in a manifest (one row per
file: path, label, split, content hash, size, status, reason) and splits the
usable images, per class and deterministically, into an **index** split and a
held-out **query** split that evaluation never indexes.

Registered datasets (``dataset.name`` in application.yaml):

``tuxpaint``
    Debian's ``tuxpaint-stamps-default``: colour object drawings, class =
    ``<group>/<category>``. The default demo dataset.
``folder``
    Any ``root/<class>/<image>`` tree (the original project's ``data/`` layout).
``fashion-mnist``
    Debian's ``dataset-fashion-mnist`` idx files (or the official download).
``caltech101``
    ``101_ObjectCategories/<class>/*.jpg`` (``BACKGROUND_Google`` dropped), from a
    local copy or the official download.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import urllib.request
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from vslib.atomic import atomic_path
from vslib.config import Config, DatasetConfig
from vslib.errors import MACHINE_ERRNOS, DatasetError, environment_fault
from vslib.integrity import DamagedFile, Finding, audit_file, set_aside, verify
from vslib.locks import locked
from vslib.images import ImageError, file_hash, load_image
from vslib.registry import DATASETS

log = logging.getLogger(__name__)

CHECK_COLUMNS = ["content_hash", "width", "height", "status", "reason"]
MANIFEST_COLUMNS = ["path", "label", "split", "content_hash", "width", "height", "status", "reason"]
SPLITS = ("index", "query")


# ---------------------------------------------------------------------------
# Dataset sources


class Dataset:
    """A source of ``(path, label)`` pairs. Subclasses implement :meth:`items`; :data:`vslib.registry.DATASETS`
    names them (``dataset.name``)."""

    def __init__(self, cfg: DatasetConfig, work_dir: Path):
        self.cfg = cfg
        self.work_dir = Path(work_dir)

    def items(self) -> list[tuple[str, str]]:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


#: the label of a file found beside the class folders (at the dataset root): it is listed as skipped, never used
OUTSIDE_CLASS = ""


def folder_items(root: Path, *, drop: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``root/<class>/<file>`` pairs; files nested deeper count for their top class folder.

    Every non-hidden entry that is not a folder is listed, images or not (dangling
    symbolic links, pipes), so that a stray non-image is recorded in the manifest with
    its reason instead of vanishing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist; set dataset.root to a folder "
                           "holding one sub-folder of images per class")
    out = [(str(f.absolute()), OUTSIDE_CLASS) for f in sorted(root.iterdir())  # listed as skipped by prepare
           if not f.is_dir() and not _is_hidden(f.name)]
    for cls in sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name)):
        if cls.name in drop:
            continue
        for f in sorted(cls.rglob("*")):
            if not f.is_dir() and not any(_is_hidden(part) for part in f.relative_to(root).parts):
                # a dangling link is listed under its own name (check_file records why it is skipped)
                out.append((str(f.resolve() if f.exists() else f.absolute()), cls.name))
    if all(label == OUTSIDE_CLASS for _, label in out):
        raise DatasetError(f"dataset folder {str(root)!r} holds no class sub-folders with files "
                           "(expected root/<class>/<image>)")
    return out


class FolderDataset(Dataset):
    """Any ``root/<class>/<image>`` tree (``dataset.root``)."""

    def items(self):
        return folder_items(Path(self.cfg.root).expanduser())


# -- Tux Paint ---------------------------------------------------------------

TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_PACKAGE = "tuxpaint-stamps-default"
_VARIANT_SUFFIXES = ("_mirror", "_flip", "_back")


def apt_install(package: str, what: str) -> None:
    """Install a Debian package when allowed (root with apt-get); else explain how."""
    how = f"install it with `sudo apt-get install {package}`"
    if shutil.which("apt-get") is None:
        raise DatasetError(f"{what} is missing and this system has no apt-get; {how} on a Debian/Ubuntu "
                           "machine, or point dataset.root at a copy")
    if os.geteuid() != 0:
        raise DatasetError(f"{what} is missing; {how} (needs root), or point dataset.root at a copy")
    log.info("installing Debian package %s (once) ...", package)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0 and cmd[1] == "install":
            raise DatasetError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()[-500:]}; "
                               f"{how} yourself, or point dataset.root at a copy")


class TuxPaintDataset(Dataset):
    """Tux Paint stamps; class = ``<group>/<category>`` (files directly in a group: ``<group>``)."""

    def root(self) -> Path:
        root = Path(self.cfg.root).expanduser() if self.cfg.root else TUXPAINT_ROOT
        if not root.is_dir():
            if self.cfg.root or not self.cfg.install:
                raise DatasetError(f"Tux Paint stamps not found at {str(root)!r}; install the Debian package "
                                   f"{TUXPAINT_PACKAGE} (`sudo apt-get install {TUXPAINT_PACKAGE}`)"
                                   + ("" if self.cfg.root else " or set dataset.install: true"))
            apt_install(TUXPAINT_PACKAGE, f"Tux Paint stamps ({root})")
            if not root.is_dir():
                raise DatasetError(f"installed {TUXPAINT_PACKAGE} but {root} is still missing")
        return root

    def items(self):
        root = self.root()
        out = []
        for f in sorted(root.rglob("*.png")):
            if f.stem.endswith(_VARIANT_SUFFIXES):
                continue
            parts = f.relative_to(root).parts
            label = "/".join(parts[:2]) if len(parts) > 2 else parts[0]
            out.append((str(f), label))
        if not out:
            raise DatasetError(f"no Tux Paint stamps (*.png) under {root}")
        return out


# -- Fashion-MNIST -------------------------------------------------------------

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path} is not an idx file")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def download(url: str, dest: Path, *, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically; a clear DatasetError when offline."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"could not download {url} ({e}); download it by hand to {dest}") from None
    os.replace(tmp, dest)
    return dest


def split_cap(cap: int, train: int, test: int) -> tuple[int, int]:
    """How many of a class's ``train`` and ``test`` images a ``max_per_class`` of ``cap`` takes.

    Half from each part (the odd one from train); what one part lacks comes from the
    other, so a cap of 6,000 takes Fashion-MNIST's 1,000 test images and 5,000 train
    images of a class: 6,000, not 4,000.
    """
    t = min(cap // 2, test)
    n = min(cap - t, train)
    return n, min(cap - n, test)


class FashionMnistDataset(Dataset):
    """Fashion-MNIST (train + test: 70,000 28x28 greyscale product photos, 10 classes).

    The idx arrays are written out as PNG files under ``data/fashion-mnist/images``
    (only those kept after ``max_per_class``), so every stage reads real files.
    """

    def raw_dir(self) -> Path:
        candidates = [Path(self.cfg.root).expanduser()] if self.cfg.root else [FASHION_MNIST_ROOT, self.work_dir / "raw"]
        for d in candidates:
            if all((d / f).exists() for pair in FASHION_MNIST_FILES.values() for f in pair):
                return d
        if self.cfg.root or not self.cfg.install:
            raise DatasetError(f"Fashion-MNIST idx files not found in {', '.join(map(str, candidates))}; install "
                               f"`{FASHION_MNIST_PACKAGE}` (apt) or download them from {FASHION_MNIST_URL}")
        try:
            apt_install(FASHION_MNIST_PACKAGE, "Fashion-MNIST")
            return FASHION_MNIST_ROOT
        except DatasetError as apt_error:
            raw = self.work_dir / "raw"
            try:
                for pair in FASHION_MNIST_FILES.values():
                    for f in pair:
                        if not (raw / f).exists():
                            download(FASHION_MNIST_URL + f, raw / f)
            except DatasetError as e:
                raise DatasetError(f"{apt_error}; the download failed too: {e}") from None
            return raw

    def items(self):
        raw = self.raw_dir()
        cap = self.cfg.max_per_class
        out_dir = self.work_dir / "images"
        out = []
        data = {part: (read_idx(raw / img_file), read_idx(raw / lbl_file))
                for part, (img_file, lbl_file) in FASHION_MNIST_FILES.items()}
        for part, (images, labels) in data.items():
            for c, cls in enumerate(FASHION_MNIST_CLASSES):
                idx = np.flatnonzero(labels == c)
                if cap is not None:  # deterministic: the first images of each part
                    take = split_cap(cap, *(int(np.sum(data[q][1] == c)) for q in ("train", "test")))
                    idx = idx[: take[0] if part == "train" else take[1]]
                for i in idx:
                    out.append((out_dir / cls / f"{part}-{i:05d}.png", cls, images, i))
        missing = [o for o in out if not o[0].exists()]
        if missing:
            from PIL import Image
            from tqdm.auto import tqdm

            for path, _, images, i in tqdm(missing, desc="writing Fashion-MNIST PNGs", unit="img"):
                with atomic_path(path, suffix=".png") as tmp:
                    Image.fromarray(images[i]).save(tmp)
        return [(str(p), cls) for p, cls, _, _ in out]


# -- Caltech-101 -----------------------------------------------------------------

CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
CALTECH101_DIR = "101_ObjectCategories"
CALTECH101_DROP = ("BACKGROUND_Google",)


def find_caltech101(root: Path) -> Optional[Path]:
    """The ``101_ObjectCategories`` folder at or under ``root`` (depth <= 2), if any."""
    for cand in (root, root / CALTECH101_DIR, root / "caltech-101" / CALTECH101_DIR,
                 root / "caltech101" / CALTECH101_DIR):
        if cand.name == CALTECH101_DIR and cand.is_dir():
            return cand
    return None


class Caltech101Dataset(Dataset):
    """Caltech-101 in its official layout; ``BACKGROUND_Google`` (clutter, not a class) is dropped."""

    def items(self):
        root = Path(self.cfg.root).expanduser()
        found = find_caltech101(root)
        if found is None:
            if not self.cfg.install:
                raise DatasetError(f"no {CALTECH101_DIR} folder at or under {str(root)!r}; download "
                                   f"{CALTECH101_URL} and unpack it there")
            found = self._download(root)
        return folder_items(found, drop=CALTECH101_DROP)

    def _download(self, root: Path) -> Path:
        archive = download(CALTECH101_URL, root / "caltech-101.zip", timeout=60)
        with zipfile.ZipFile(archive) as z:
            z.extractall(root)
        for tgz in root.rglob(f"{CALTECH101_DIR}.tar.gz"):
            with tarfile.open(tgz) as t:
                t.extractall(tgz.parent, filter="data")
        found = find_caltech101(root)
        if found is None:
            raise DatasetError(f"unpacked {archive} but found no {CALTECH101_DIR} folder under {root}")
        return found


#: Debian packages of the offline datasets, and the folder each installs
SYSTEM_PACKAGES = {TUXPAINT_PACKAGE: TUXPAINT_ROOT, FASHION_MNIST_PACKAGE: FASHION_MNIST_ROOT}


def install_system_datasets(echo: Callable[[str], None] = print) -> None:
    """Install the Debian dataset packages that are missing (the demo's and the tests' data)."""
    for package, root in SYSTEM_PACKAGES.items():
        if root.is_dir():
            echo(f"{package}: present ({root})")
        else:
            apt_install(package, f"{package} ({root})")
            echo(f"{package}: installed ({root})")


def get_dataset(cfg: Config) -> Dataset:
    """The dataset ``cfg.dataset.name`` names (its class: :data:`vslib.registry.DATASETS`)."""
    return DATASETS.resolve(cfg.dataset.name)(cfg.dataset, cfg.dataset_dir)


# ---------------------------------------------------------------------------
# Checking, splitting, the manifest


def check_file(path: str, max_pixels: int) -> dict:
    """Hash and fully decode one file; return its manifest fields."""
    row = {"content_hash": "", "width": 0, "height": 0, "status": "ok", "reason": ""}
    try:
        if not_regular := _not_a_regular_file(path):
            row.update(status="skipped", reason=not_regular)
            return row
        row["content_hash"] = file_hash(path)
        w, h = load_image(path, max_pixels=max_pixels).size
        row.update(width=w, height=h)
    except ImageError as e:
        row.update(status="skipped", reason=e.reason)
    except OSError as e:  # unreadable file (permissions, I/O error)
        if e.errno in MACHINE_ERRNOS:  # too many open files: the machine's fault, not this file's
            raise environment_fault(e, path) from e
        row.update(status="skipped", reason=f"unreadable file ({e.strerror or e})")
    return row


def _not_a_regular_file(path: str) -> str:
    """Why ``path`` cannot be read as an image file ('' when it is a regular file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return "file not found (removed after it was listed)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, socket or device)"
    return ""


def _order_key(seed: int, label: str, content_hash: str) -> str:
    return hashlib.sha1(f"{seed}:{label}:{content_hash}".encode()).hexdigest()


def assign_splits(df: pd.DataFrame, *, query_fraction: float, seed: int, min_query: int = 1) -> pd.Series:
    """Deterministic stratified split of the usable rows into 'index' and 'query'.

    Within each class, rows are ordered by a seeded hash of their content, and
    the first ``max(min_query, round(n * query_fraction))`` (leaving at least
    one image to index) become queries. The order depends only on each image's
    own content, so adding images to one class never reshuffles another.
    """
    split = pd.Series("", index=df.index, dtype=object)
    ok = df[df["status"] == "ok"]
    for label, grp in ok.groupby("label", sort=True):
        keys = grp["content_hash"].map(lambda h: _order_key(seed, label, h))
        order = keys.sort_values(kind="stable").index
        n = len(order)
        n_query = 0 if query_fraction <= 0 and min_query <= 0 else max(min_query, round(n * query_fraction))
        n_query = min(n_query, n - 1)
        split.loc[order[:n_query]] = "query"
        split.loc[order[n_query:]] = "index"
    return split


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


@locked(lambda cfg: cfg.dataset_dir, lambda cfg: f"the {cfg.dataset.name} manifest {cfg.manifest_path}")
def prepare(cfg: Config, *, force: bool = False, progress: bool = True,
            echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Find, check and split the configured dataset; write and return the manifest.

    Files unchanged since the last run (same size and mtime) are not re-read
    unless ``force``. Every file appears in the manifest: unusable ones with
    ``status='skipped'`` and the reason, summarised at the end.
    """
    from tqdm.auto import tqdm

    dcfg = cfg.dataset
    pairs = get_dataset(cfg).items()
    df = pd.DataFrame(pairs, columns=["path", "label"])

    # Raw per-file checks are cached by (path, size, mtime): unchanged files are not re-read.
    checks_path = cfg.dataset_dir / "checks.parquet"
    previous = {}
    if checks_path.exists() and not force:
        try:
            verify(checks_path, full=True, redo="its checks are redone by this run")
            previous = {r.path: r for r in pd.read_parquet(checks_path).itertuples(index=False)}
        except (DamagedFile, OSError, ValueError, AttributeError) as e:  # ArrowInvalid is a ValueError
            moved = set_aside(checks_path)
            echo(f"warning: {checks_path}: damaged ({getattr(e, 'reason', e)}); set aside as "
                 f"{moved.name if moved else '-'}, every image is checked again")
            previous = {}
    stamps = [_stat_key(p) for p in df["path"]]

    rows: list[Optional[dict]] = [None] * len(df)
    todo = []
    for i, (path, stamp) in enumerate(zip(df["path"], stamps)):
        prev = previous.get(path)
        if prev is not None and stamp and prev.stamp == stamp:
            rows[i] = {c: getattr(prev, c) for c in CHECK_COLUMNS}
        else:
            todo.append(i)
    if todo:
        workers = min(32, (os.cpu_count() or 2) * 2)
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(lambda i: check_file(df.at[i, "path"], dcfg.max_image_pixels), todo)
            for i, row in tqdm(zip(todo, results), total=len(todo), desc=f"checking {dcfg.name} images",
                               unit="img", disable=not progress):
                rows[i] = row
    df = pd.concat([df, pd.DataFrame(rows, index=df.index, columns=CHECK_COLUMNS)], axis=1)
    write_parquet(df.assign(stamp=stamps), checks_path)
    outside = df["label"] == OUTSIDE_CLASS  # a file beside the class folders: listed, never used
    if outside.any():
        df.loc[outside, "status"] = "skipped"
        df.loc[outside, "reason"] = "outside any class folder (move it into <root>/<class>/ to use it)"

    # Exact duplicates would leak between splits (a query finding itself): keep the first.
    ok = df["status"] == "ok"
    # (among usable rows only: a skipped file, e.g. one outside any class folder, never makes a usable one a duplicate)
    dup = ok & df[ok].duplicated("content_hash", keep="first").reindex(df.index, fill_value=False) \
        & (df["content_hash"] != "")
    if dup.any():
        first = df[ok & ~dup].drop_duplicates("content_hash").set_index("content_hash")["path"]
        df.loc[dup, "reason"] = "duplicate of " + df.loc[dup, "content_hash"].map(first)
        df.loc[dup, "status"] = "skipped"

    # Cap per class (deterministic sample), then drop classes that are too small.
    capped = 0
    if dcfg.max_per_class is not None:
        keep = pd.Series(True, index=df.index)
        for label, grp in df[df["status"] == "ok"].groupby("label"):
            if len(grp) > dcfg.max_per_class:
                keys = grp["content_hash"].map(lambda h: _order_key(dcfg.split.seed + 1, label, h))
                keep.loc[keys.sort_values(kind="stable").index[dcfg.max_per_class:]] = False
        capped = int((~keep).sum())
        df = df[keep].reset_index(drop=True)
    counts = df[df["status"] == "ok"].groupby("label").size()
    small = counts[counts < dcfg.min_per_class]
    if len(small):
        m = df["label"].isin(small.index) & (df["status"] == "ok")
        df.loc[m, "reason"] = df.loc[m, "label"].map(
            lambda lbl: f"class has {counts[lbl]} usable images (< dataset.min_per_class={dcfg.min_per_class})")
        df.loc[m, "status"] = "skipped"

    if (df["status"] == "ok").sum() == 0:
        raise DatasetError(f"no usable images in dataset {dcfg.name!r}: {len(df)} files, all skipped "
                           f"({_reason_summary(df)}); check dataset.root and dataset.min_per_class")
    if df.loc[df["status"] == "ok", "label"].nunique() < 2:
        raise DatasetError(f"dataset {dcfg.name!r} has fewer than 2 classes with at least "
                           f"{dcfg.min_per_class} usable images; a classifier needs at least 2")

    df["split"] = assign_splits(df, query_fraction=dcfg.split.query_fraction, seed=dcfg.split.seed,
                                min_query=dcfg.split.min_query_per_class)
    df["width"] = df["width"].astype("int64")
    df["height"] = df["height"].astype("int64")
    df = df[MANIFEST_COLUMNS]
    write_parquet(df, cfg.manifest_path)
    echo(summary(df, capped=capped, path=cfg.manifest_path))
    return df


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write atomically, with a checksum sidecar: a crash never leaves a half-written file behind, and a file
    changed afterwards is found when it is read."""
    with atomic_path(path, verified=True) as tmp:
        df.to_parquet(tmp, index=False)


def audit(cfg: Config) -> list[Finding]:
    """Full check of the dataset's manifest and checks file (:class:`~vslib.integrity.Finding` each)."""
    out = []
    for path, what, redo in ((cfg.manifest_path, "manifest", "the next `visualsearch run` (or `data prepare`) "
                                                             "rewrites it"),
                             (cfg.dataset_dir / "checks.parquet", "image checks", "the next `visualsearch run` "
                                                                                  "(or `data prepare`) redoes them")):
        if not path.exists():
            out.append(Finding(str(path), what, "missing", "not prepared yet", redo))
            continue
        f = audit_file(path, what, redo)
        if not f.bad:
            try:
                pd.read_parquet(path, columns=["path"])
            except (OSError, ValueError, KeyError) as e:
                f.status, f.reason = "damaged", f"unreadable: {e}"
        out.append(f)
    return out


def _reason_kind(reason: str) -> str:
    """'too large: 1x2 = ...' -> 'too large'; 'class has 3 usable images ...' -> 'in too-small classes'."""
    if reason.startswith("class has"):
        return "in too-small classes"
    if reason.startswith("duplicate of"):
        return "exact duplicates"
    return reason.split(" (")[0].split(":")[0]


def _reason_summary(df: pd.DataFrame, limit: int = 8) -> str:
    skipped = df[df["status"] != "ok"]
    kinds = Counter(_reason_kind(r) for r in skipped["reason"])
    return ", ".join(f"{n} {k}" for k, n in kinds.most_common(limit))


def summary(df: pd.DataFrame, *, capped: int = 0, path: Optional[Path] = None) -> str:
    """A few lines for people: sizes of the splits, and every skipped file with its reason."""
    ok = df[df["status"] == "ok"]
    n_idx, n_q = int((ok["split"] == "index").sum()), int((ok["split"] == "query").sum())
    lines = [f"{len(ok)} images in {ok['label'].nunique()} classes: {n_idx} to index, {n_q} held-out queries"
             + (f" (manifest: {path})" if path else "")]
    if capped:
        lines.append(f"{capped} images above dataset.max_per_class not used")
    skipped = df[df["status"] != "ok"]
    if len(skipped):
        lines.append(f"{len(skipped)} files skipped: {_reason_summary(skipped)}")
        bad_first = skipped["reason"].str.startswith(("class has", "duplicate of")).sort_values(kind="stable")
        shown = skipped.loc[bad_first.index].head(10)
        for r in shown.itertuples():
            lines.append(f"  - {r.path}: {r.reason}")
        if len(skipped) > len(shown):
            lines.append(f"  ... and {len(skipped) - len(shown)} more (see the manifest's status/reason columns)")
    return "\n".join(lines)


def load_manifest(cfg: Config, *, include_skipped: bool = False, columns=None) -> pd.DataFrame:
    """The manifest written by :func:`prepare`; by default only the usable rows.

    ``columns`` reads only those columns (plus ``status``, to filter), as large
    collections' readers should.
    """
    if not cfg.manifest_path.exists():
        raise DatasetError(f"no manifest at {cfg.manifest_path}; run `visualsearch data prepare -c {cfg.source}` first")
    if columns is not None:
        columns = list(dict.fromkeys([*columns, "status"]))
    redo = f"the next `visualsearch run` (or `visualsearch data prepare -c {cfg.source}`) rewrites it"
    verify(cfg.manifest_path, full=True, redo=redo)
    try:
        df = pd.read_parquet(cfg.manifest_path, columns=columns)
    except (OSError, ValueError, KeyError) as e:
        raise DamagedFile(cfg.manifest_path, f"unreadable: {e}", redo) from None
    if not include_skipped:
        df = df[df["status"] == "ok"].reset_index(drop=True)
    return df
