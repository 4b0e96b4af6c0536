"""Read a PyTorch state dict (.pth) into numpy arrays, without PyTorch.

Two on-disk formats exist. Since PyTorch 1.6 `torch.save` writes a zip holding `<dir>/data.pkl` and
one raw file per storage, `<dir>/data/<key>`. Before that (and still with
`_use_new_zipfile_serialization=False`) it wrote a stream of pickles: magic number, protocol
version, system info, the object, the list of storage keys, then each storage as an int64 element
count followed by its bytes. The EfficientNet-Lite0 file shipped on PyPI is of the older kind.

A pickle can call any importable function, so the unpickler resolves only the few globals a plain
tensor state dict needs and refuses the rest; tensor views are bounds-checked before they touch memory.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FeatureCacheError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> element type, stored little-endian by every PyTorch release we can read.
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class _Refused(Exception):
    """A pickle asked for something a state dict never needs."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


class _Storage:
    """One flat buffer; the legacy format only fills `data` after the object pickle."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        native = data.dtype.newbyteorder("=")
        if min((self.offset, *self.size, *self.stride), default=0) < 0:
            raise ValueError("negative tensor size, stride or offset")
        if 0 in self.size:
            return np.zeros(self.size, dtype=native)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= data.size:  # as_strided would read past the buffer
            raise ValueError("tensor view runs past its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * data.itemsize for s in self.stride],
            writeable=False)
        return np.array(view, dtype=native)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(np.dtype(code)) for name, code in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storage_for):
        super().__init__(file)
        self._storage_for = storage_for

    def find_class(self, module, name):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return self._storage_for(pid)


def load_state_dict(path) -> dict[str, np.ndarray]:
    """name -> array for every tensor in a PyTorch state dict file, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise FeatureCacheError(f"{path}: no such checkpoint file; check the path")
    try:
        loader = _load_zip if zipfile.is_zipfile(path) else _load_legacy
        refs = loader(path)
        return _materialize(refs)
    except _Refused as e:
        raise FeatureCacheError(f"{path}: refusing to load, its pickle references {e} which a plain "
                                f"state dict never needs; only load checkpoints you trust") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise FeatureCacheError(f"{path}: not a readable PyTorch checkpoint, truncated, corrupt or of another "
                                f"format ({type(e).__name__}: {e}); pass a file written by torch.save, or "
                                f"re-install or re-download it") from None


def _load_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise ValueError("zip has no <dir>/data.pkl")
        prefix = pkl[: -len("data.pkl")]
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder") != b"little":
            raise ValueError("big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def storage_for(pid):
            _, stype, key, _location, numel = pid[:5]
            if key not in storages:
                raw = zf.read(f"{prefix}data/{key}")
                storage = _Storage(stype.dtype, int(numel))
                storage.data = _buffer(raw, storage)
                storages[key] = storage
            return storages[key]

        with zf.open(pkl) as f:
            return _Unpickler(f, storage_for).load()


def _load_legacy(path: Path) -> dict:
    storages: dict[str, _Storage] = {}

    def storage_for(pid):
        _, stype, key, _location, numel, view = pid
        if view is not None:
            raise ValueError("storage views are not supported")
        return storages.setdefault(key, _Storage(stype.dtype, int(numel)))

    with open(path, "rb") as f:
        magic, protocol = (_Unpickler(f, storage_for).load() for _ in range(2))
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise ValueError("not a PyTorch checkpoint (bad magic number or protocol)")
        sys_info = _Unpickler(f, storage_for).load()
        if not sys_info.get("little_endian", False):
            raise ValueError("big-endian checkpoints are not supported")
        refs = _Unpickler(f, storage_for).load()
        for key in _Unpickler(f, storage_for).load():
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise ValueError(f"storage {key} holds {numel} elements, expected {storage.numel}")
            storage.data = _buffer(f.read(numel * storage.dtype.itemsize), storage)
    return refs


def _buffer(raw: bytes, storage: _Storage) -> np.ndarray:
    if len(raw) < storage.numel * storage.dtype.itemsize:
        raise ValueError(f"storage data ends early ({len(raw)} bytes)")
    return np.frombuffer(raw, dtype=storage.dtype, count=storage.numel)


def _materialize(refs) -> dict[str, np.ndarray]:
    if not isinstance(refs, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRef)
                                             for k, v in refs.items()):
        raise ValueError("not a plain state dict of named tensors")
    for name, ref in refs.items():
        if ref.storage.data is None:
            raise ValueError(f"storage of {name} was never written")
    return {name: ref.to_numpy() for name, ref in refs.items()}
