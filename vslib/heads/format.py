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

from pathlib import Path

import numpy as np

from vslib.atomic import atomic_write_json

#: bump when a change to the saved format makes older saved models stale
FORMAT_VERSION = 2
MODEL_FILE = "model.keras"
STATE_FILE = "head.npz"
LABELS_FILE = "labels.json"
METADATA_FILE = "metadata.json"
#: what the next run does about a damaged classifier
RETRAIN = "the next `visualsearch train` (or `run`) retrains the classifier"


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
