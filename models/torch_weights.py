"""Read PyTorch (torchvision) checkpoints into numpy arrays without importing torch.

torch is a multi-GB install and ``torch.load`` unpickles arbitrary objects. A state dict needs
very little of that machinery, so this module implements the two on-disk formats directly:

* zip format (torch >= 1.6 default): ``<prefix>/data.pkl`` plus one raw record
  ``<prefix>/data/<key>`` per storage (optionally ``<prefix>/byteorder``);
* legacy format: a magic number, the protocol version and a ``sys_info`` dict (each a pickle),
  the object pickle, a pickled list of storage keys, then for every key an 8-byte
  little-endian element count followed by the storage's raw bytes.

Unpickling goes through a restricted ``pickle.Unpickler``: only the handful of globals a state
dict refers to are resolved (to local stand-ins); anything else is refused, so a malicious
file cannot run code. Sizes are checked before data is read: the tensors' declared shapes are
handed to the caller's ``select`` (the backbone checks them against its own parameters) and
the storages to read must fit in the file, so a small crafted file cannot allocate gigabytes.

The restricted unpickler, the error wording and the size checks are shared with the Paddle
``.pdparams`` reader (models/paddle_weights.py).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import pickle
import struct
import zipfile

from typing import Callable, Iterable

import numpy as np

__all__ = ["WeightsError", "RestrictedUnpickler", "UnsupportedObject", "CorruptError", "Select",
           "load_torch_checkpoint", "names_to_read", "weights_file_errors"]

# torch.serialization.MAGIC_NUMBER and PROTOCOL_VERSION of the legacy format.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage class name (as pickled: GLOBAL 'torch <name>') -> numpy dtype of its elements.
# BFloat16 has no numpy dtype: it is read as uint16 and widened to float32 (exact).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    # An untyped storage is a plain byte buffer.
    "UntypedStorage": np.dtype(np.uint8),
}

# torch dtype objects pickle as GLOBAL 'torch <name>'; they only ever appear as markers.
_TORCH_DTYPE_NAMES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16",
    "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "bool",
}


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the requested network."""


class UnsupportedObject(pickle.UnpicklingError):
    """The pickle refers to something a state dict never holds."""


class CorruptError(Exception):
    """Data inconsistent with the pickle; turned into WeightsError with the path."""


# Given the declared shape of every array in a weights file, before any array data is read:
# the names to read. May raise WeightsError to refuse the file (e.g. shapes that do not fit).
Select = Callable[[dict], Iterable[str]]


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves globals only through ``resolve(module, name)`` (None: refused)
    and persistent ids only through ``persistent_load`` (None: refused), so nothing in the file
    can name a function to call."""

    def __init__(self, file, resolve: Callable[[str, str], object], persistent_load=None,
                 supported: str = "arrays and dicts of arrays"):
        super().__init__(file, encoding="utf-8")
        self._resolve = resolve
        self._persistent_load = persistent_load
        self._supported = supported

    def find_class(self, module, name):
        found = self._resolve(module, name)
        if found is None:
            raise UnsupportedObject(f"refusing to load {module}.{name} (only {self._supported} are supported)")
        return found

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        return self._persistent_load(pid)


@contextlib.contextmanager
def weights_file_errors(path: str, kind: str):
    """Turn whatever a damaged or crafted file makes the readers raise into one WeightsError
    line naming the file; ``kind`` names the format ("torch checkpoint")."""
    try:
        yield
    except WeightsError:
        raise
    except CorruptError as e:
        raise WeightsError(f"{path}: truncated or corrupt {kind} ({e})") from None
    except EOFError:
        raise WeightsError(f"{path}: truncated {kind} (unexpected end of file)") from None
    except UnsupportedObject as e:
        raise WeightsError(f"{path}: unsupported object in {kind}: {e}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: not a {kind} ({e})") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error,
            UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as e:
        # Malformed pickles surface as assorted builtin errors from the unpickler.
        raise WeightsError(f"{path}: not a {kind} ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None


def array_bytes(shape, dtype: np.dtype) -> int:
    """Bytes of an array of `shape` (exact integer arithmetic: a crafted shape cannot overflow)."""
    return math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize


def names_to_read(path: str, declared: dict, select: Select | None) -> list[str]:
    """The entries to read, decided from `declared` ({name: (shape, dtype)}) before any data.

    With `select`, the caller checks the shapes (the backbone compares them with its own);
    without, every entry is read and together they must fit in the file, which holds the data
    of every array once: more is a crafted file that would make a few bytes cost gigabytes.
    """
    if select is not None:
        names = list(select({name: tuple(shape) for name, (shape, _) in declared.items()}))
        unknown = [name for name in names if name not in declared]
        if unknown:
            raise ValueError(f"select returned names the file does not hold: {unknown[:3]}")
        return names
    total = sum(array_bytes(shape, dtype) for shape, dtype in declared.values())
    file_size = os.path.getsize(path)
    if total > file_size:
        raise WeightsError(f"{path}: truncated or crafted: declares {total} bytes of arrays in a file "
                           f"of {file_size} bytes")
    return list(declared)


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class seen in a pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES.get(name)  # None for TypedStorage (dtype unknown)

    def __repr__(self):
        return f"torch.{self.name}"


class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object seen in a pickle."""

    def __init__(self, name: str):
        self.name = name


class _StorageRef:
    """A storage named in the pickle; its bytes are read after unpickling, and only if a tensor
    that is read needs them."""

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel
        # Legacy format only: this storage is a slice [offset, offset + numel) of `view_of`.
        self.view_of: _StorageRef | None = None
        self.view_offset = 0

    @property
    def root(self) -> "_StorageRef":
        return self.view_of or self

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage_type.dtype.itemsize


class _LazyTensor:
    """Result of ``_rebuild_tensor*``: geometry of a tensor whose storage is not read yet."""

    def __init__(self, storage, storage_offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor is not backed by a storage")
        self.storage = storage
        self.storage_offset = int(storage_offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride):
            raise pickle.UnpicklingError("tensor size and stride differ in length")
        if any(n < 0 for n in self.size):
            raise pickle.UnpicklingError(f"negative tensor size {self.size}")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED_FUNCTIONS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    # Old pickles may spell sizes as torch.Size (a tuple subclass).
    ("torch", "Size"): tuple,
}


def _resolve_torch_global(module: str, name: str):
    """The local stand-in for a global a torch state dict refers to; None for anything else."""
    if (module, name) in _ALLOWED_FUNCTIONS:
        return _ALLOWED_FUNCTIONS[(module, name)]
    if module in ("torch", "torch.storage") and (name in _STORAGE_DTYPES or name == "TypedStorage"):
        return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPE_NAMES:
        return _TorchDtype(name)
    return None


def _unpickle(f, persistent_load=None):
    return RestrictedUnpickler(f, _resolve_torch_global, persistent_load,
                               supported="tensors and dicts of tensors").load()


def _parse_storage_pid(pid, legacy: bool):
    """Check a persistent id ('storage', type, key, location, numel[, view]) and unpack it."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
        raise UnsupportedObject(f"unsupported persistent id {pid!r:.80}")
    storage_type, key, _location, numel = pid[1:5]
    view_metadata = pid[5] if legacy and len(pid) > 5 else None
    if not isinstance(storage_type, _StorageType):
        raise UnsupportedObject(f"unsupported storage type {storage_type!r:.80}")
    if storage_type.dtype is None:
        raise UnsupportedObject(f"storage type {storage_type.name} has no dtype")
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"bad storage size {numel!r:.80}")
    return storage_type, str(key), numel, view_metadata


def _materialise(tensor: _LazyTensor, storage_array: np.ndarray) -> np.ndarray:
    """Build a contiguous, native-endian copy of `tensor` from its storage's elements."""
    storage_type = tensor.storage.storage_type
    count = math.prod(tensor.size)
    if count > 0:
        if tensor.storage_offset < 0 or any(s < 0 for s in tensor.stride):
            raise CorruptError("negative tensor offset or stride")
        last = tensor.storage_offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
        # as_strided reads raw memory: never let it step outside the storage.
        if last >= storage_array.shape[0]:
            raise CorruptError(
                f"tensor reaches element {last} of a storage of {storage_array.shape[0]}"
            )
        itemsize = storage_array.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage_array[tensor.storage_offset:],
            shape=tensor.size,
            strides=tuple(s * itemsize for s in tensor.stride),
            writeable=False,
        )
        array = np.array(view, copy=True, order="C")
    else:
        array = np.empty(tensor.size, dtype=storage_array.dtype)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if storage_type.name == "BFloat16Storage":
        # bfloat16 is the upper half of a float32.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _storage_dtype(storage_type: _StorageType, byteorder: str) -> np.dtype:
    return storage_type.dtype.newbyteorder(">" if byteorder == "big" else "<")


def _read_zip(path: str, archive: zipfile.ZipFile):
    """(object, read_storages): read_storages(roots) -> {key: elements} reads only `roots`."""
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightsError(f"{path}: not a torch checkpoint (zip file without one <folder>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in archive.namelist():
        with archive.open(prefix + "byteorder") as record:
            byteorder = record.read(16).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise WeightsError(f"{path}: unknown byte order {byteorder!r} in torch checkpoint")

    storages: dict[str, _StorageRef] = {}

    def persistent_load(pid):
        storage_type, key, numel, _ = _parse_storage_pid(pid, legacy=False)
        if key not in storages:
            storages[key] = _StorageRef(key, storage_type, numel)
        return storages[key]

    with archive.open(pickles[0]) as data_pkl:
        obj = _unpickle(data_pkl, persistent_load)

    def read_storages(roots) -> dict[str, np.ndarray]:
        arrays = {}
        for ref in roots:
            record = f"{prefix}data/{ref.key}"
            try:
                info = archive.getinfo(record)
            except KeyError:
                raise CorruptError(f"storage record {record} is missing") from None
            if info.file_size < ref.nbytes:
                raise CorruptError(f"storage {ref.key} holds {info.file_size} bytes, expected {ref.nbytes}")
            with archive.open(info) as data:
                raw = data.read(ref.nbytes)  # never more than the pickle declared
            if len(raw) < ref.nbytes:
                raise CorruptError(f"storage {ref.key} holds {len(raw)} bytes, expected {ref.nbytes}")
            arrays[ref.key] = np.frombuffer(raw, dtype=_storage_dtype(ref.storage_type, byteorder),
                                            count=ref.numel)
        return arrays

    return obj, read_storages


def _read_legacy(path: str, f):
    """(object, read_storages) of the legacy format; its storages follow the object pickle."""
    magic = _unpickle(f)
    if magic != LEGACY_MAGIC_NUMBER:
        raise WeightsError(f"{path}: not a torch checkpoint (wrong magic number)")
    protocol = _unpickle(f)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise WeightsError(f"{path}: unsupported torch legacy protocol version {protocol!r}")
    sys_info = _unpickle(f)
    little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    byteorder = "little" if little_endian else "big"

    storages: dict[str, _StorageRef] = {}

    def persistent_load(pid):
        storage_type, key, numel, view_metadata = _parse_storage_pid(pid, legacy=True)
        if key not in storages:
            storages[key] = _StorageRef(key, storage_type, numel)
        root = storages[key]
        if view_metadata is None:
            return root
        # A view (view_key, offset, view_size) into the root storage.
        view_key, offset, view_size = view_metadata
        view_key = str(view_key)
        if view_key not in storages:
            view = _StorageRef(view_key, storage_type, int(view_size))
            view.view_of, view.view_offset = root, int(offset)
            storages[view_key] = view
        return storages[view_key]

    obj = _unpickle(f, persistent_load)
    keys = _unpickle(f)
    if not isinstance(keys, list):
        raise WeightsError(f"{path}: not a torch checkpoint (no storage key list)")
    file_size = os.fstat(f.fileno()).st_size

    def read_storages(roots) -> dict[str, np.ndarray]:
        wanted = {ref.key for ref in roots}
        arrays: dict[str, np.ndarray] = {}
        for key in keys:
            key = str(key)
            if key not in storages:
                raise CorruptError(f"storage {key} is listed but never used")
            dtype = _storage_dtype(storages[key].storage_type, byteorder)
            header = f.read(8)
            if len(header) < 8:
                raise CorruptError(f"file ends before storage {key}")
            (count,) = struct.unpack("<q", header)
            nbytes = count * dtype.itemsize
            if count < 0 or nbytes > file_size - f.tell():
                raise CorruptError(f"file ends inside storage {key}")
            if key in wanted:
                raw = f.read(nbytes)
                if len(raw) < nbytes:
                    raise CorruptError(f"file ends inside storage {key}")
                arrays[key] = np.frombuffer(raw, dtype=dtype)
            else:
                f.seek(nbytes, os.SEEK_CUR)
            if len(arrays) == len(wanted):
                break
        missing = wanted - set(arrays)
        if missing:
            raise CorruptError(f"storage {sorted(missing)[0]} has no data")
        return arrays

    return obj, read_storages


def _unwrap_state_dict(obj):
    """Checkpoints often wrap the state dict: {'state_dict': {...}} or {'model': {...}}."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                return obj[wrapper]
    return obj


def load_torch_checkpoint(path, select: Select | None = None) -> dict[str, np.ndarray]:
    """Read a torch-saved state dict (zip or legacy format) as {name: numpy array}.

    `select` (see Select) sees every tensor's declared shape before any tensor data is read and
    names the tensors to read; without it, all are read. Raises WeightsError (one line naming
    the file) when the file is missing, is not a torch checkpoint, is truncated, declares more
    data than it can hold, or holds anything other than a (possibly wrapped) dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    with weights_file_errors(path, "torch checkpoint"):
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                obj, read_storages = _read_zip(path, archive)
                return _to_state_dict(path, obj, read_storages, select)
        with open(path, "rb") as f:
            obj, read_storages = _read_legacy(path, f)
            return _to_state_dict(path, obj, read_storages, select)


def _to_state_dict(path, obj, read_storages, select: Select | None) -> dict[str, np.ndarray]:
    state = _unwrap_state_dict(obj)
    if not isinstance(state, dict):
        raise WeightsError(
            f"{path}: unsupported object in torch checkpoint: {type(state).__name__}, "
            "expected a state dict"
        )
    tensors: dict[str, _LazyTensor] = {}
    for name, value in state.items():
        if not isinstance(value, _LazyTensor):
            raise WeightsError(
                f"{path}: unsupported object in torch checkpoint: entry {name!r} is "
                f"{type(value).__name__}, not a tensor"
            )
        tensors[str(name)] = value
    declared = {name: (t.size, t.storage.storage_type.dtype) for name, t in tensors.items()}
    names = names_to_read(path, declared, select)
    roots = {tensors[name].storage.root.key: tensors[name].storage.root for name in names}
    # A tensor may view part of a storage; storages larger than both the file and the tensors
    # read from them exist only in crafted files (a compressed zip record inflating to GBs).
    storage_bytes = sum(ref.nbytes for ref in roots.values())
    limit = max(os.path.getsize(path), sum(array_bytes(*declared[name]) for name in names))
    if storage_bytes > limit:
        raise WeightsError(f"{path}: truncated or crafted: declares {storage_bytes} bytes of storage, more "
                           f"than the file ({os.path.getsize(path)} bytes) or its tensors hold")
    arrays = read_storages(roots.values())

    def elements(ref: _StorageRef) -> np.ndarray:
        data = arrays[ref.root.key]
        if ref.view_of is not None:
            data = data[ref.view_offset: ref.view_offset + ref.numel]
        if data.shape[0] < ref.numel:
            raise CorruptError(f"storage {ref.key} is shorter than its declared size")
        return data

    return {name: _materialise(tensors[name], elements(tensors[name].storage)) for name in names}
