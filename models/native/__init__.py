"""The Gaussian fit's compiled kernels (gaussian.c beside this file), built at first use.

The C source is compiled once per machine with the system C compiler (``$CC``, else cc, gcc or
clang; ``-O3 -march=native``) into a cache folder (``$PADIM_CACHE_DIR`` or ~/.cache/padim-paddle),
keyed by the source, the compiler, its flags and the CPU, so a shared home never hands one CPU
another's instructions. The library is then checked on a small problem against a float64 NumPy
computation before it is used. Without a compiler (or with ``PADIM_NATIVE=0``) ``gaussian_kernels``
returns None and models/padim.py runs the same maths in NumPy; ``kernel_status`` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("padim")
SOURCE = Path(__file__).with_name("gaussian.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC"]
PORTABLE_FLAGS = [flag for flag in FLAGS if flag != "-march=native"]
COMPILE_TIMEOUT_S = 120

_state: dict = {}


class GaussianKernels:
    """ctypes bindings of gaussian.c (see its comment for the array layouts)."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        i64, pointer = ctypes.c_int64, ctypes.c_void_p
        self.path = path
        self.lanes = int(library.padim_lanes())
        self._update = library.padim_gram_update
        self._update.argtypes = [pointer, i64, i64, i64, pointer, pointer, pointer, i64, i64, ctypes.c_int, ctypes.c_int]
        self._update.restype = ctypes.c_int
        self._whitening = library.padim_whitening
        self._whitening.argtypes = [pointer, pointer, i64, i64, i64, ctypes.c_double, i64, i64, pointer]
        self._whitening.restype = i64
        self._mahalanobis = library.padim_mahalanobis
        self._mahalanobis.argtypes = [pointer, pointer, pointer, i64, i64, i64, i64, i64, pointer, pointer, pointer]
        self._mahalanobis.restype = ctypes.c_int
        self._row_support = library.padim_row_support
        self._row_support.argtypes = [pointer, i64, i64, i64, pointer]
        self._row_support.restype = None

    def blocks(self, positions: int) -> int:
        return -(-int(positions) // self.lanes)

    def gram_update(self, x: np.ndarray, shift: np.ndarray, gram: np.ndarray, sums: np.ndarray,
                    block0: int, block1: int, first: bool = False, positions_first: bool = False) -> None:
        """Add the batch x [B, d, P] (or [P, B, d] with ``positions_first``; float32, C order)
        to blocks [block0, block1); ``first``: write instead (``gram`` and ``sums`` may then be
        uninitialised)."""
        if positions_first:
            positions, batch, d = x.shape
        else:
            batch, d, positions = x.shape
        if self._update(x.ctypes.data, batch, d, positions, shift.ctypes.data, gram.ctypes.data,
                        sums.ctypes.data, block0, block1, int(bool(first)), int(bool(positions_first))) != 0:
            raise MemoryError("no memory for the Gram update's scratch buffer")

    def whitening(self, gram: np.ndarray, sums: np.ndarray, n: int, d: int, positions: int, eps: float,
                  block0: int, block1: int) -> tuple[int, bool]:
        """Write the whitening of blocks [block0, block1) over ``gram``; returns (first bad
        position or -1, whether its statistics were not finite)."""
        nonfinite = ctypes.c_int32(0)
        bad = self._whitening(gram.ctypes.data, sums.ctypes.data, n, d, positions, float(eps), block0, block1,
                              ctypes.byref(nonfinite))
        if bad == -2:
            raise MemoryError("no memory for the factorisation's scratch buffer")
        return int(bad), bool(nonfinite.value)


    def mahalanobis(self, embeddings: np.ndarray, mean: np.ndarray, whitening: np.ndarray, out: np.ndarray,
                    start: int, stop: int, rows: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Distances of positions [start, stop) into out [B, P]: embeddings [P, B, d], mean
        [P, d], whitening [P, d, d] (float32, C order). ``rows``: (order, first_column) of the
        whitening from models.padim.whitening_rows, which lets the products skip its zero blocks; None
        treats it as dense."""
        positions, batch, d = embeddings.shape
        if rows is None:
            rows = np.arange(d, dtype=np.int32), np.zeros(d, dtype=np.int32)
        order, first_column = (np.ascontiguousarray(a, dtype=np.int32) for a in rows)
        if order.shape != (d,) or first_column.shape != (d,):
            raise ValueError(f"row structure of {order.shape} rows for whitening rows of {d}")
        if self._mahalanobis(embeddings.ctypes.data, mean.ctypes.data, whitening.ctypes.data, batch, d, positions,
                             start, stop, order.ctypes.data, first_column.ctypes.data, out.ctypes.data) != 0:
            raise MemoryError("no memory for the scoring's scratch buffer")

    def row_support(self, whitening: np.ndarray, start: int, stop: int, first: np.ndarray) -> None:
        """Lower first [d] (int32) to the first column of each whitening row holding a non-zero
        or NaN at positions [start, stop)."""
        _, d, _ = whitening.shape
        self._row_support(whitening.ctypes.data, d, start, stop, first.ctypes.data)


def kernel_status() -> str:
    """'compiled: PATH', or why the NumPy path is used."""
    gaussian_kernels()
    return _state["status"]


def gaussian_kernels() -> GaussianKernels | None:
    """The compiled kernels, built and checked once per process; None where they cannot be."""
    if "kernels" not in _state:
        kernels, status = None, "disabled by PADIM_NATIVE=0"
        if os.environ.get("PADIM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off"):
            try:
                kernels = load_kernels()
                status = f"compiled: {kernels.path}"
            except KernelError as exc:
                status = f"not compiled ({exc}); the NumPy path runs instead"
                LOGGER.debug(f"Gaussian kernels {status}")
        _state["kernels"], _state["status"] = kernels, status
    return _state["kernels"]


class KernelError(RuntimeError):
    """The kernels could not be built, loaded or verified."""


def find_compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("PADIM_CACHE_DIR") or Path.home() / ".cache" / "padim-paddle") / "native"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def load_kernels(compiler: str | None = None, directory: Path | None = None) -> GaussianKernels:
    """Build (or reuse) the shared library, load it and check it; raises KernelError."""
    compiler = compiler or find_compiler()
    if not compiler:
        raise KernelError("no C compiler found: set CC or install gcc")
    source = SOURCE.read_bytes()
    identity = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                          _compiler_version(compiler).encode(), _cpu_signature().encode(),
                                          platform.machine().encode()])).hexdigest()[:16]
    errors = []
    for folder in (directory or cache_dir(), Path(tempfile.gettempdir()) / f"padim-native-{os.getuid()}"):
        library = folder / f"gaussian-{identity}.so"
        try:
            _check_private(folder)
            if not library.is_file():
                _compile(compiler, folder, library, errors)
            kernels = GaussianKernels(ctypes.CDLL(str(library)), library)
        except (OSError, KernelError) as exc:
            errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            continue
        _self_check(kernels)
        return kernels
    raise KernelError("; ".join(errors))


def _check_private(folder: Path) -> None:
    """The library is loaded into this process: its folder must be ours and not writable by
    others (a shared /tmp could otherwise hand us someone else's file under the expected name)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise KernelError(f"{folder} is not a private folder of this user (owner or group/other write bits)")


def _compile(compiler: str, folder: Path, library: Path, errors: list) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for flags in (FLAGS, PORTABLE_FLAGS):   # a compiler without -march=native still builds
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=library.stem, suffix=".tmp")
        os.close(descriptor)
        try:
            result = subprocess.run([compiler, *flags, "-o", temporary, str(SOURCE), "-lm"], capture_output=True,
                                    text=True, timeout=COMPILE_TIMEOUT_S)
            if result.returncode == 0:
                os.chmod(temporary, 0o755)
                os.replace(temporary, library)   # atomic: another process never loads half a file
                return
            errors.append(f"{Path(compiler).name} {' '.join(flags)}: " + (result.stderr.strip().splitlines() or ["failed"])[-1])
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{Path(compiler).name}: {exc}")
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    raise KernelError(errors[-1])


def _self_check(kernels: GaussianKernels) -> None:
    """A 21-position, d=6 fit through the kernels against float64 NumPy (a wrong build must not
    produce models)."""
    rng = np.random.default_rng(0)
    n, d, positions = 9, 6, 21
    x = rng.normal(size=(n, d, positions)).astype(np.float32)
    shift = np.ascontiguousarray(x[:4].mean(axis=0))
    blocks = kernels.blocks(positions)
    gram = np.full((blocks * kernels.lanes, d, d), np.nan, dtype=np.float32)   # "uninitialised"
    sums = np.full((blocks, d, kernels.lanes), np.nan)
    kernels.gram_update(np.ascontiguousarray(x[:4]), shift, gram, sums, 0, blocks, first=True)
    kernels.gram_update(np.ascontiguousarray(x[4:].transpose(2, 0, 1)), shift, gram, sums, 0, blocks,
                        positions_first=True)
    bad, _ = kernels.whitening(gram, sums, n, d, positions, 0.01, 0, blocks)
    samples = x.astype(np.float64).transpose(2, 0, 1)
    expected = np.stack([np.linalg.inv(np.cov(s, rowvar=False) + 0.01 * np.eye(d)) for s in samples])
    whitening = gram[:positions].astype(np.float64)
    if bad != -1 or not np.allclose(whitening @ whitening.transpose(0, 2, 1), expected, rtol=1e-4, atol=1e-5):
        raise KernelError(f"{kernels.path} failed its check against NumPy")
    test = np.ascontiguousarray(x[:5].transpose(2, 0, 1))                          # [P, 5, d]
    mean = np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32)
    distances = np.empty((5, positions), dtype=np.float32)
    kernels.mahalanobis(test, mean, np.ascontiguousarray(gram[:positions]), distances, 0, positions)
    centred = test.astype(np.float64) - mean[:, None, :]
    expected = np.sqrt(np.einsum("pbi,pij,pbj->bp", centred, np.linalg.inv(np.linalg.inv(expected)), centred))
    if not np.allclose(distances, expected, rtol=1e-4):
        raise KernelError(f"{kernels.path} failed its check against NumPy (scoring)")
    # whole vectors of columns (d >= 16, the last block overlapping), rows permuted and skipped
    d, batch, positions = 21, 9, 3
    triangular = np.triu(rng.normal(size=(positions, d, d))).astype(np.float32)
    permutation = rng.permutation(d)
    whitening = np.ascontiguousarray(triangular[:, permutation, :])    # row i: triangle row permutation[i]
    first = np.full(d, d, dtype=np.int32)
    kernels.row_support(whitening, 0, positions, first)
    order = np.argsort(first, kind="stable").astype(np.int32)
    test = rng.normal(size=(positions, batch, d)).astype(np.float32)
    mean = rng.normal(size=(positions, d)).astype(np.float32)
    distances = np.empty((batch, positions), dtype=np.float32)
    kernels.mahalanobis(test, mean, whitening, distances, 0, positions, (order, first[order]))
    whitened = np.einsum("pbi,pij->pbj", test.astype(np.float64) - mean[:, None, :], whitening.astype(np.float64))
    if not (np.array_equal(first, permutation)
            and np.allclose(distances, np.sqrt((whitened ** 2).sum(axis=2)).T, rtol=1e-4)):
        raise KernelError(f"{kernels.path} failed its check against NumPy (structured scoring)")
