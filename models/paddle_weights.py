"""Read Paddle ``.pdparams`` weights into numpy arrays without running anything from the file.

``paddle.load`` unpickles without restriction, so a crafted file runs code. ``paddle.save`` of a
state dict writes a plain pickle: a dict of name -> numpy array (each pickled as
``numpy._core.multiarray._reconstruct`` + a BUILD state (version, shape, dtype, fortran order,
raw bytes), the dtype as ``numpy.dtype`` + its state), plus a name table
``"StructuredToParameterName@@"`` of strings; a tensor saved outside a state dict is a tuple
``(name, array)``; protocol 2 spells raw bytes as ``_codecs.encode(text, "latin1")``. This reader
resolves exactly those globals, to local stand-ins that only record data: an array is built
here, with numpy's own constructors, from a validated shape, a numeric dtype and raw bytes of
the matching length, and only for the entries the caller selects from the declared shapes.
"""

from __future__ import annotations

import collections
import os

import numpy as np

from models.torch_weights import (RestrictedUnpickler, Select, WeightsError, UnsupportedObject, array_bytes,
                                  names_to_read, weights_file_errors)

__all__ = ["load_paddle_weights"]

KIND = "Paddle weights file"
# Written by paddle.save beside the arrays: structured name -> parameter name (strings only).
NAME_TABLE_KEY = "StructuredToParameterName@@"
# Written by paddle.save (pickle protocol 2 or 3) for arrays above 1 GiB, cut into slices.
SLICED_ARRAYS_KEY = "UnpackBigParamInfor@@"  # typos: disable-line
# Numeric element types only: an object array would unpickle arbitrary Python objects.
_ARRAY_KINDS = {"b", "i", "u", "f"}


class _NdarrayClass:
    """Stand-in for ``numpy.ndarray`` (only ever the first argument of _reconstruct)."""


_NDARRAY = _NdarrayClass()


class _DtypeSpec:
    """Stand-in for ``numpy.dtype(name, align, copy)`` followed by its pickled state."""

    def __init__(self, name, align=False, copy=True):
        if not isinstance(name, str):
            raise UnsupportedObject(f"dtype {name!r:.40} is not a type name")
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise UnsupportedObject(f"structured or sub-array dtype {self.name!r:.40}")
        if state[1] not in ("<", ">", "|", "="):
            raise UnsupportedObject(f"byte order {state[1]!r:.10}")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        try:
            dtype = np.dtype(self.name)
        except TypeError:
            raise UnsupportedObject(f"unknown dtype {self.name!r:.40}") from None
        if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise UnsupportedObject(f"arrays of {dtype} (only numeric arrays are supported)")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


class _ArraySpec:
    """An array declared in the pickle: shape, dtype and raw bytes, checked; built on demand."""

    def __init__(self):
        self.shape: tuple[int, ...] = ()
        self.dtype = np.dtype(np.float32)
        self.fortran_order = False
        self.raw = b""

    def __setstate__(self, state):
        # ndarray.__reduce__'s state: (version, shape, dtype, is_fortran, raw bytes)
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsupportedObject("array state is not (version, shape, dtype, order, data)")
        _version, shape, dtype, fortran_order, raw = state
        self._set(shape, dtype, bool(fortran_order), raw)

    def _set(self, shape, dtype, fortran_order: bool, raw):
        if not isinstance(dtype, _DtypeSpec):
            raise UnsupportedObject(f"array dtype {dtype!r:.40}")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise UnsupportedObject(f"array shape {shape!r:.60}")
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsupportedObject(f"array data of type {type(raw).__name__} (object arrays are not supported)")
        self.shape, self.dtype, self.fortran_order = shape, dtype.resolve(), fortran_order
        if len(raw) != array_bytes(shape, self.dtype):
            raise UnsupportedObject(f"array of shape {shape} and dtype {self.dtype} with {len(raw)} bytes of data")
        self.raw = raw

    def build(self) -> np.ndarray:
        """A contiguous, native-endian copy (the file's bytes are not kept alive by the result)."""
        flat = np.frombuffer(self.raw, dtype=self.dtype)
        array = flat.reshape(self.shape, order="F" if self.fortran_order else "C")
        return np.array(array, dtype=self.dtype.newbyteorder("="), order="C", copy=True)


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise UnsupportedObject("_reconstruct of something other than numpy.ndarray")
    return _ArraySpec()


def _frombuffer(buffer, dtype, shape, order):
    # numpy's pickle for protocol 5 (in-band buffer)
    spec = _ArraySpec()
    spec._set(tuple(shape), dtype, order == "F", buffer)
    return spec


def _latin1_bytes(text, encoding):
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1"); nothing else is accepted.
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsupportedObject("_codecs.encode other than of a latin1 string")
    return text.encode("latin1")


def _empty_bytes(*args):
    # Protocol 2 pickles b"" as __builtin__.bytes(); bytes(n) would allocate n bytes.
    if args:
        raise UnsupportedObject("bytes() with arguments")
    return b""


_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # pickles of numpy < 2
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeSpec,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "tuple"): tuple,
    ("__builtin__", "tuple"): tuple,       # protocol 2 spells builtins the Python 2 way
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _latin1_bytes,
}


def _resolve(module: str, name: str):
    return _ALLOWED_GLOBALS.get((module, name))


def _declared_arrays(path: str, obj) -> dict[str, _ArraySpec]:
    """{name: array spec} of a loaded pickle; anything but arrays (and the name table) refused."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: unsupported object in {KIND}: {type(obj).__name__}, expected a dict of arrays")
    if SLICED_ARRAYS_KEY in obj:
        raise WeightsError(f"{path}: holds arrays above 1 GiB cut into slices, which no supported backbone has")
    arrays = {}
    for name, value in obj.items():
        if name == NAME_TABLE_KEY and isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            continue
        # A tensor saved outside a state dict: (tensor name, array).
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            value = value[1]
        if not isinstance(name, str) or not isinstance(value, _ArraySpec):
            raise WeightsError(f"{path}: unsupported object in {KIND}: entry {name!r:.60} is "
                               f"{type(value).__name__}, not an array")
        arrays[name] = value
    return arrays


def load_paddle_weights(path, select: Select | None = None) -> dict[str, np.ndarray]:
    """Read a ``paddle.save``d dict of arrays (a state dict) as {name: numpy array}.

    `select` (models.torch_weights.Select) sees every array's declared shape before any array
    is built and names those to build; without it, all are built. Raises WeightsError, one line
    naming the file, for a missing, damaged or crafted file: any global other than the numpy
    array machinery, a non-numeric dtype, data that does not match its shape, or arrays that
    together declare more bytes than the file holds.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    with weights_file_errors(path, KIND):
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, _resolve, supported="numpy arrays and dicts of arrays").load()
        specs = _declared_arrays(path, obj)
        # Each array's bytes are in the file once; more in total means shared (memoised) data
        # that building would copy over and over.
        names = names_to_read(path, {name: (spec.shape, spec.dtype) for name, spec in specs.items()}, select)
        file_size = os.path.getsize(path)
        total = sum(array_bytes(specs[name].shape, specs[name].dtype) for name in names)
        if total > file_size:
            raise WeightsError(f"{path}: truncated or crafted: declares {total} bytes of arrays in a file "
                               f"of {file_size} bytes")
        return {name: specs[name].build() for name in names}
