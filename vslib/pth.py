"""Read PyTorch ``.pth`` state dicts without torch.

Only what the backbones need: a state dict of dense tensors, saved in torch's
*legacy* format (a plain stream of pickles, not a zip archive) or the newer
zip format. Tensors come back as NumPy arrays, keys in file order.

>>> sd = load_state_dict(path)          # doctest: +SKIP
>>> sd["_conv_stem.weight"].shape       # doctest: +SKIP
(32, 3, 3, 3)
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

#: first pickle of a legacy torch file
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: torch storage class name -> NumPy dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,  # unsupported: no NumPy dtype
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthError(ValueError):
    """The file is not a torch state dict this reader understands."""


class _StorageType:
    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES or _STORAGE_DTYPES[name] is None:
            raise PthError(f"unsupported tensor storage type {name!r}")
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage placeholder; its data is filled in after the pickles are read."""

    def __init__(self, stype: _StorageType, key: str, numel: int):
        self.stype, self.key, self.numel = stype, key, numel
        self.data: np.ndarray | None = None


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise PthError(f"no data for storage {self.storage.key!r}")
        if not self.size:
            return flat[self.offset].copy()
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * item for s in self.stride], writeable=False)
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *args, **kwargs):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


class _Unpickler(pickle.Unpickler):
    """Maps the few torch globals a state dict uses to local stand-ins."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, f, storages: dict, zip_loader=None):
        super().__init__(f)
        self.storages = storages
        self.zip_loader = zip_loader

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise PthError(f"refusing to load {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid):
        # legacy: ('storage', storage_type, key, location, numel, view_metadata)
        # zip:    ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise PthError(f"unexpected persistent id {pid!r}")
        stype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if len(pid) > 5 and pid[5] is not None:
            raise PthError("storage views are not supported")
        if key not in self.storages:
            st = _Storage(stype, key, numel)
            if self.zip_loader is not None:
                st.data = self.zip_loader(key, stype.dtype)
            self.storages[key] = st
        return self.storages[key]


def _materialise(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
    return obj


def _load_legacy(f) -> dict:
    magic = pickle.load(f)
    if magic != LEGACY_MAGIC:
        raise PthError("not a torch file (bad magic number)")
    protocol = pickle.load(f)
    if protocol != LEGACY_PROTOCOL:
        raise PthError(f"unsupported torch legacy protocol {protocol}")
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        raise PthError("big-endian torch files are not supported")
    storages: dict[str, _Storage] = {}
    result = _Unpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
        st = storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * st.stype.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise PthError(f"file truncated inside storage {key!r}")
        st.data = np.frombuffer(buf, dtype=st.stype.dtype.newbyteorder("<"))
    return result


def _load_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise PthError("zip torch file without data.pkl")
        prefix = pkl[: -len("data.pkl")]

        def loader(key, dtype):
            return np.frombuffer(z.read(f"{prefix}data/{key}"), dtype=np.dtype(dtype).newbyteorder("<"))

        with z.open(pkl) as f:
            return _Unpickler(f, {}, zip_loader=loader).load()


def load_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a torch-saved state dict as ``{name: numpy array}`` without importing torch.

    Raises
    ------
    PthError
        If the file is not a torch state dict of plain tensors.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            obj = _load_zip(path)
        else:
            with open(path, "rb") as f:
                obj = _load_legacy(f)
    except PthError as e:
        raise PthError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error,
            AttributeError, IndexError, KeyError, TypeError, ValueError) as e:  # garbage, empty or truncated
        raise PthError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise PthError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return _materialise(obj)
