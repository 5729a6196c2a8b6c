"""The saved format every head shares: the files of a model directory and their version.

A trained head is a directory:

``metadata.json``
    ``format_version``, ``kind`` (the head's name), ``params``, sizes, the
    temperature and calibration, plus what the training stage adds (backbone,
    dataset, metrics, tuned search settings). Written last: its presence marks
    a complete model.
``labels.json``
    the class labels, in the order of every probability column.
``head.npz`` or ``model.keras``
    the learned state: arrays of a cross-fitted head, or a Keras model.

Each file has a checksum sidecar (:mod:`vslib.integrity`).
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vslib import integrity
from vslib.atomic import atomic_write_json
from vslib.errors import ClassifierError
from vslib.heads import HEADS, head_class

#: bump when a change to the saved format makes older saved models stale
FORMAT_VERSION = 2
MODEL_FILE = "model.keras"
STATE_FILE = "head.npz"
LABELS_FILE = "labels.json"
METADATA_FILE = "metadata.json"
#: what the next run does about a damaged classifier
RETRAIN = "the next `visualsearch train` (or `run`) retrains the classifier"
#: kinds older versions saved, read as the head they are now: ``embedding`` is the ``mlp`` head, saved under
#: the name of its class (EmbeddingClassifier) before each head had one name
SAVED_ALIASES = {"embedding": "mlp"}


def load_model(directory):
    """Load what a head's ``save`` wrote, whatever its kind; :class:`ClassifierError` if missing or incomplete."""
    directory = Path(directory)
    for name in (METADATA_FILE, LABELS_FILE, MODEL_FILE, STATE_FILE):  # small files: a full check on every load
        if (directory / name).exists() or integrity.sidecar(directory / name).exists():
            integrity.verify(directory / name, full=True, redo=RETRAIN)
    try:
        meta = json.loads((directory / METADATA_FILE).read_text())
        labels = json.loads((directory / LABELS_FILE).read_text())
    except FileNotFoundError as e:
        raise ClassifierError(f"no complete classifier in {directory} (missing {Path(e.filename).name})") from None
    except (OSError, ValueError) as e:
        raise integrity.DamagedFile(directory, f"unreadable: {e}", RETRAIN) from None
    if not isinstance(meta, dict) or not isinstance(labels, list):
        raise integrity.DamagedFile(directory / METADATA_FILE, "not the JSON a classifier writes", RETRAIN)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ClassifierError(f"{directory} holds a classifier of format {meta.get('format_version')}; "
                              f"this version reads format {FORMAT_VERSION}. Retrain with `visualsearch train`.")
    kind = SAVED_ALIASES.get(meta.get("kind"), meta.get("kind"))
    if kind not in HEADS:
        raise ClassifierError(f"{directory} holds a classifier of unknown kind {meta.get('kind')!r} "
                              f"(known: {', '.join(sorted(HEADS))}); retrain with `visualsearch train`")
    klass = head_class(kind)
    state = directory / klass.state_file
    if not state.is_file():
        raise ClassifierError(f"no complete classifier in {directory} (missing {state.name})")
    try:
        clf = klass._from_saved(directory, meta, labels)
    except (ClassifierError, integrity.DamagedFile):
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise integrity.DamagedFile(state, f"unreadable: {type(e).__name__}: {e}", RETRAIN) from None
    clf.backbone_ = meta.get("backbone")
    clf.backbone_weights_ = meta.get("backbone_weights")
    clf.dataset_ = meta.get("dataset")
    clf.vectors_ = meta.get("vectors")  # the backbone's vector_key (weights; int8: the calibrated model)
    clf.metadata_ = meta
    return clf


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically, with its checksum sidecar (numpy scalars and arrays as plain JSON)."""
    atomic_write_json(path, obj, default=_json_default, verified=True)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
