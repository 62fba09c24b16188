"""Data parallelism through paddle.distributed: which rank does what, and how ranks agree.

Run a script under ``python -m paddle.distributed.launch --nproc_per_node N script.py ...``
(NCCL on GPUs, gloo on CPUs, chosen by Paddle). Without the launcher every function here is a
no-op for rank 0 of 1, and nothing is initialised.

PaDiM's fit is a sum (per-position count, Σ(x - shift), Σ(x - shift)(x - shift)ᵀ), so N ranks
that each stream a disjoint ``shard`` and add their sums (``pooled_shift``, ``all_reduce_sum``)
give the one-process model. Evaluation scores shards and gathers the per-image results on rank
0 in the original order (``gather_to_rank0``).

Waiting. A gloo collective gives up after 30 s (gloo's own default, which Paddle's Python API
does not expose), so no rank may wait inside a collective for a peer that is still busy: a rank
whose shard ends a minute earlier, or ranks waiting while rank 0 finalizes. Waits go through
``step`` instead: each rank reports its outcome (ok, or failed with its message) in the
launcher's key-value store, which the others poll with no time limit of their own. The
collectives run right after a step, when every rank is there, in chunks that each take far less
than gloo's limit.

When a rank dies. One that raises inside a ``step`` tells the others, which stop with one line
naming it (``PeerFailure``). One killed outright cannot: on its own machine the launcher
notices the exit (it polls every second) and sends the other processes SIGTERM (SIGKILL 3 s
later), which ``init`` turns into a one-line exit that still runs ``finally`` blocks, so no temp
file is left beside the save path. The launchers on other machines are not told; there each
rank's heartbeat (a thread that counts in the store every second) tells the ranks waiting in a
``step`` that a peer went silent. A collective whose peer is gone fails (gloo: when the peer's
socket closes, else after its 30 s) and becomes a ``PeerFailure`` as well.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import threading
import time
import zlib
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import numpy as np

from datasets import DataError
from models.model_file import first_line

T = TypeVar("T")

# Collectives move at most this much per call (float64 bytes): memory beyond the arrays themselves
# stays O(chunk), and each call stays far below gloo's 30 s.
DEFAULT_CHUNK_BYTES = 64 << 20
_POLL_SECONDS = 0.05
# How long a failing rank waits for the others to read its message before it exits: rank 0
# holds the store they read it from, and the launcher, once any process has exited, stops the
# rest before they could print the line that names the cause.
_FAREWELL_SECONDS = 10.0
_MESSAGE_CHARS = 400
_KEY_PREFIX = "padim"
_HEARTBEAT_SECONDS = 1.0
# A rank whose heartbeat stops this long is taken for dead. Generous: the beat comes from a thread,
# which a long call holding the GIL (a multi-GB save) can delay.
DEFAULT_PEER_SILENCE_S = 60.0
_OK, _FAILED, _STOPPED = 1, 2, 3


class PeerFailure(RuntimeError):
    """Another rank failed or vanished; this rank stops. The message is one line for the user."""


class Context(NamedTuple):
    rank: int
    world_size: int
    is_distributed: bool


# Work that one rank does alone under the launcher (a whole category of ``round_robin``): no shards,
# no steps, no collectives. Functions that take ``ranks`` accept it.
SINGLE = Context(0, 1, False)


def context() -> Context:
    """(rank, world_size, is_distributed) from the launcher's environment; rank 0 of 1 without it."""
    world = _int_env("PADDLE_TRAINERS_NUM", 1)
    rank = _int_env("PADDLE_TRAINER_ID", 0)
    if world <= 1:
        return Context(0, 1, False)
    if not 0 <= rank < world:
        raise RuntimeError(f"PADDLE_TRAINER_ID={rank} is outside 0..{world - 1} (PADDLE_TRAINERS_NUM={world})")
    return Context(rank, world, True)


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} is not an integer") from None


_STATE = {"initialised": False, "steps": 0, "peer_silence_s": DEFAULT_PEER_SILENCE_S}
_HEARTBEATS: dict[int, tuple[int, float]] = {}   # rank -> (last count seen, when it last changed)


def init(peer_silence_s: float = DEFAULT_PEER_SILENCE_S) -> Context:
    """Join the launcher's process group once (no-op without the launcher), make the launcher's
    SIGTERM a one-line exit that runs ``finally`` blocks, and start this rank's heartbeat.
    ``peer_silence_s``: how long a rank may go without a heartbeat before the ranks waiting for
    it stop (the launcher stops a pod when one of its own processes dies, but not when a process
    on another machine does). Returns ``context()``."""
    ctx = context()
    if not ctx.is_distributed or _STATE["initialised"]:
        return ctx
    import paddle.distributed as dist
    if not dist.is_initialized():
        dist.init_parallel_env()
    _STATE["initialised"] = True
    _STATE["peer_silence_s"] = peer_silence_s
    # The first beat from this thread: a count of 0 then means a rank that never got this far,
    # not one whose heartbeat thread could not connect.
    _store().add(f"{_KEY_PREFIX}/alive/{ctx.rank}", 1)
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    stop = threading.Event()
    heartbeat = threading.Thread(target=_beat, args=(ctx.rank, stop), name="padim-heartbeat", daemon=True)
    heartbeat.start()

    def stop_beating():
        # before the interpreter tears down: a thread still holding a store connection then
        # aborts the process
        stop.set()
        heartbeat.join(timeout=2 * _HEARTBEAT_SECONDS)

    atexit.register(stop_beating)
    return ctx


def _store_address() -> tuple[str, int]:
    """Where the launcher's store listens: as ``paddle.distributed.init_parallel_env`` finds it."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    else:
        endpoint = os.environ.get("PADDLE_MASTER") or os.environ["PADDLE_TRAINER_ENDPOINTS"].split(",")[0]
        host, port = endpoint.rsplit(":", 1)
    return host, int(port)


def _beat(rank: int, stop: threading.Event) -> None:
    try:
        from paddle.base import core
        host, port = _store_address()
        # a connection of its own: a store client is not meant to be shared between threads
        # (world size 0: joins without counting itself as a worker of the store)
        store = core.TCPStore(host, port, False, 0)
        while not stop.is_set():
            store.add(f"{_KEY_PREFIX}/alive/{rank}", 1)
            stop.wait(_HEARTBEAT_SECONDS)
    except Exception:
        pass   # the store is gone with rank 0: the main thread learns it on its next call


def _stopped_by_launcher(signum, frame):
    # the launcher repeats its SIGTERM (three times, 0.2 s apart): a second one must not
    # interrupt the clean-up this one starts (it sends SIGKILL 3 s later regardless)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx = context()
    raise SystemExit(f"error: rank {ctx.rank} of {ctx.world_size}: stopped by the launcher "
                     "(another rank failed, or the job was cancelled)")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Round robin: ``items[rank::world]``. Disjoint, their union is ``items``, sizes differ by
    at most one, and ``gather_to_rank0`` restores the order. Callers sort ``items`` first so every
    rank cuts the same list; round robin also spreads a sorted list's groups (a test split's
    defect types, the alphabet of categories) evenly over the ranks."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    return list(items[rank::world])


def check_same_list(items: Sequence[str], what: str) -> None:
    """DataError on every rank unless every rank sees the same ``items`` (e.g. the sorted image
    paths relative to the data root): ranks on several machines with differing copies of the
    data would otherwise shard different lists, overlapping or missing images silently. Waits
    for all ranks (a ``step``). Without the launcher: nothing to compare."""
    ctx = context()
    if not ctx.is_distributed:
        return
    with step(f"listing the {what}"):
        digest = zlib.crc32("\0".join(map(str, items)).encode("utf-8"))
    _same_everywhere(f"listing the {what}", np.array([len(items), digest], dtype=np.int64),
                     f"the ranks see different {what} (this rank: {len(items)}); every machine needs the same data")


def shard_size(total: int, rank: int, world: int) -> int:
    """``len(shard(range(total), rank, world))`` without the list."""
    return len(range(rank, total, world))


def shard_line(count: int, what: str) -> str:
    """The log line that shows the split, e.g. ``rank 1 of 2: 104 training images``."""
    ctx = context()
    return f"rank {ctx.rank} of {ctx.world_size}: {count} {what}"


# ---- agreeing on outcomes ---------------------------------------------------------------------

def _store():
    from paddle.base import core
    return core.create_or_get_global_tcp_store()


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__   # one line
    return text.removeprefix("error: ")[:_MESSAGE_CHARS]


class _Step:
    """Keys of one step in the store: every rank reports once (state 1 ok, 2 failed, with a
    message), then counts itself ``done`` once it has read the outcome."""

    def __init__(self, name: str, ctx: Context, timeout_s: float | None):
        _STATE["steps"] += 1
        self.name, self.ctx, self.timeout_s = name, ctx, timeout_s
        # numbered: every rank runs the same steps in the same order
        self.key = f"{_KEY_PREFIX}/{_STATE['steps']}/{name}"
        self.store = _store()
        self.reported = False
        self.last_liveness_check = 0.0

    def _add(self, suffix: str, amount: int) -> int:
        return self._add_key(f"{self.key}/{suffix}", amount)

    def _add_key(self, key: str, amount: int) -> int:
        try:
            return self.store.add(key, amount)
        except Exception:   # Paddle raises ValueError or RuntimeError for a closed connection
            raise PeerFailure(self._lost()) from None

    def _lost(self) -> str:
        return (f"rank {self.ctx.rank} of {self.ctx.world_size}: lost contact with rank 0 "
                f"(it holds the launcher's store) during {self.name}")

    def report(self, error: BaseException | None) -> None:
        """ok (state 1), failed (2, with its message), or stopped because another rank failed (3)."""
        if error is None:
            self._add(f"state/{self.ctx.rank}", _OK)
        else:
            try:
                self.store.set(f"{self.key}/error/{self.ctx.rank}", _message(error))
            except Exception:
                raise PeerFailure(self._lost()) from None
            self._add(f"state/{self.ctx.rank}", _STOPPED if isinstance(error, PeerFailure) else _FAILED)
            self._add("failed", 1)
        self._add("reported", 1)
        self.reported = True

    def first_failure(self) -> str:
        """The line for this rank's PeerFailure: the lowest rank that failed by itself, else the
        lowest that stopped."""
        states = {rank: self._add(f"state/{rank}", 0) for rank in range(self.ctx.world_size)}
        culprits = [r for r, s in states.items() if s == _FAILED] or [r for r, s in states.items() if s == _STOPPED]
        prefix = f"rank {self.ctx.rank} of {self.ctx.world_size}: stopping"
        if not culprits:
            return f"{prefix}, a rank failed during {self.name}"
        try:
            message = self.store.get(f"{self.key}/error/{culprits[0]}").decode("utf-8", "replace")
        except Exception:
            message = "(its message was lost)"
        if states[culprits[0]] == _STOPPED:
            return f"{prefix}: {message}"
        return f"{prefix}, rank {culprits[0]} failed during {self.name}: {message}"

    def publish(self, text: str) -> None:
        """This rank's result of the step, for rank 0 to read once all have reported."""
        try:
            self.store.set(f"{self.key}/result/{self.ctx.rank}", text)
        except Exception:
            raise PeerFailure(self._lost()) from None

    def published(self, rank: int) -> str:
        return self.store.get(f"{self.key}/result/{rank}").decode("utf-8")

    def missing(self) -> list[int]:
        return [rank for rank in range(self.ctx.world_size) if self._add(f"state/{rank}", 0) == 0]

    def check_alive(self) -> None:
        """PeerFailure if a rank that has not reported stopped beating (at most once a second)."""
        now = time.monotonic()
        if now - self.last_liveness_check < _HEARTBEAT_SECONDS:
            return
        self.last_liveness_check = now
        silence = _STATE["peer_silence_s"]
        for rank in self.missing():
            if rank == self.ctx.rank:
                continue
            count = self._add_key(f"{_KEY_PREFIX}/alive/{rank}", 0)
            seen, since = _HEARTBEATS.get(rank, (None, now))
            if count != seen:
                _HEARTBEATS[rank] = (count, now)
            elif now - since > silence:
                # a count still 0: the rank died before it joined (init's first beat)
                silent = "sent no heartbeat" if count == 0 else "stopped responding"
                raise PeerFailure(f"rank {self.ctx.rank} of {self.ctx.world_size}: stopping, rank {rank} "
                                  f"{silent} during {self.name} (no heartbeat for {silence:g} s)")

    def wait(self) -> None:
        """Until every rank reported; PeerFailure as soon as one reports a failure."""
        start = time.monotonic()
        while True:
            if self._add("failed", 0) > 0:
                message = self.first_failure()
                self._add("done", 1)
                raise PeerFailure(message)
            if self._add("reported", 0) >= self.ctx.world_size:
                break
            self.check_alive()
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                raise PeerFailure(f"rank {self.ctx.rank} of {self.ctx.world_size}: gave up after "
                                  f"{self.timeout_s:g} s waiting for rank(s) {self.missing()} to finish {self.name}")
            time.sleep(_POLL_SECONDS)
        self._add("done", 1)
        if self.ctx.rank == 0:   # the store lives in this process: keep it until all have read
            self.linger(_STATE["peer_silence_s"])

    def linger(self, limit_s: float) -> None:
        start = time.monotonic()
        while self._add("done", 0) < self.ctx.world_size:
            if time.monotonic() - start > limit_s:
                return
            time.sleep(_POLL_SECONDS)


_ACTIVE: list["_Progress"] = []   # the steps this rank is inside, innermost last


@contextmanager
def step(name: str, timeout_s: float | None = None, ranks: Context | None = None):
    """Run the block on every rank, then wait until all ranks finished it.

    A rank whose block raises tells the others and re-raises its own error. The others raise
    ``PeerFailure`` naming it when they reach the end of the block, or at ``check()`` inside it;
    likewise when a rank that has not finished stops beating for ``peer_silence_s`` (``init``).
    No time limit otherwise; ``timeout_s`` bounds the wait at the end (not the block). Every
    rank must run the same steps in the same order. Without the launcher, or with ``ranks``
    ``SINGLE`` (this rank works alone): just the block, and ``check()`` looks at the step it is
    nested in, if any.

        with distributed.step("training shard") as progress:
            for batch in loader:
                progress.check()        # stop early when another rank failed
                fit.update(...)
    """
    ctx = context() if ranks is None else ranks
    if not ctx.is_distributed:
        yield _NoProgress()
        return
    state = _Step(name, ctx, timeout_s)
    progress = _Progress(state)
    _ACTIVE.append(progress)
    try:
        yield progress
    except BaseException as error:
        try:
            if not state.reported:   # a PeerFailure from this step's own check() was reported there
                state.report(error)
                state._add("done", 1)
            if not isinstance(error, SystemExit):
                state.linger(_FAREWELL_SECONDS)
        except Exception:
            pass   # the store is gone too: the launcher ends the others
        raise
    finally:
        _ACTIVE.remove(progress)
    state.report(None)
    state.wait()


class _NoProgress:
    def check(self) -> None:
        """The enclosing step's check (work done alone inside a ``round_robin``), else nothing."""
        if _ACTIVE:
            _ACTIVE[-1].check()


class _Progress:
    def __init__(self, state: _Step):
        self._state = state

    def check(self) -> None:
        """PeerFailure now if another rank already reported a failure (one store round trip)."""
        state = self._state
        try:
            if state._add("failed", 0) > 0:
                raise PeerFailure(state.first_failure())
            state.check_alive()
        except PeerFailure as failure:
            state.report(failure)
            state._add("done", 1)
            raise


def finalize_on_rank0(work: Callable[[], T], name: str = "writing the model",
                      timeout_s: float | None = None, ranks: Context | None = None) -> T | None:
    """Rank 0 runs ``work()`` (finalize, calibrate, write atomically) while the others wait; every
    rank returns only when it succeeded: rank 0 with its result, the others with None. If it
    fails, rank 0 re-raises its error and the others raise PeerFailure with its message. Without
    the launcher (or with ``ranks`` ``SINGLE``): ``work()``."""
    ctx = context() if ranks is None else ranks
    if not ctx.is_distributed:
        return work()
    with step(name, timeout_s, ctx):
        if ctx.rank == 0:
            return work()
    return None


@contextmanager
def held_on_rank0(acquire: Callable[[], Any], name: str, ranks: Context | None = None):
    """Rank 0 enters the context manager ``acquire()`` (e.g. the lock of the output folder, which
    only the writer takes) for the block; every rank starts the block only once it holds it,
    and the others stop with PeerFailure if it cannot. Without the launcher: ``acquire()``."""
    ctx = context() if ranks is None else ranks
    if not ctx.is_distributed:
        with acquire() as held:
            yield held
        return
    with ExitStack() as stack:
        held = None
        with step(name, ranks=ctx):
            if ctx.rank == 0:
                held = stack.enter_context(acquire())
        yield held


def round_robin(items: Sequence[str], work: Callable[[str], Any], name: str) -> dict | None:
    """Each rank runs ``work(item)`` for its ``shard`` of the sorted ``items``, alone (``work``
    passes ``SINGLE`` on to the pipeline: no shards inside); the ranks wait for each other at the
    end, and rank 0 returns every item's result (JSON values, sent through the launcher's store)
    as {item: result} in the sorted order; the other ranks return None. One ``step`` around it
    all: a rank that fails stops the others at their next ``check()``. Without the launcher:
    every item here."""
    ctx = context()
    ordered = sorted(items)
    if not ctx.is_distributed:
        return {item: work(item) for item in ordered}
    mine = shard(ordered, ctx.rank, ctx.world_size)
    with step(name) as progress:
        done = {item: work(item) for item in mine}
        progress._state.publish(json.dumps(done, allow_nan=True))
    if ctx.rank != 0:
        return None
    results = {}
    for rank in range(ctx.world_size):
        results.update(json.loads(progress._state.published(rank)))
    return {item: results[item] for item in ordered}


# ---- moving numbers -------------------------------------------------------------------------

def _collective(what: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except RuntimeError as error:
        ctx = context()
        raise PeerFailure(f"rank {ctx.rank} of {ctx.world_size}: lost contact with another rank during "
                          f"{what} ({first_line(error)})") from None


def _row_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    step_rows = max(1, chunk_bytes // max(1, row_bytes))
    return [(start, min(start + step_rows, rows)) for start in range(0, rows, step_rows)]


def all_reduce_sum(array, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Sum ``array`` over all ranks in place, computed in float64 (int64 for integer arrays),
    and return it. A NumPy array (host) or a Paddle tensor (any device) of any shape, e.g. a
    [P, d, d] Gram stack: it goes in slices along axis 0 of at most ``chunk_bytes`` as float64,
    so no rank holds a second full copy. A float64 array (a fit's sums, and its Gram matrices
    where they fit models.padim's GRAM_FLOAT64_MAX_BYTES) is summed as it is; a float32 one
    (WR50-Rd550's Gram) gets the float64 sum rounded once.
    Call it right after a ``step``, on every rank, with the same shape. Without the launcher:
    the array unchanged."""
    ctx = context()
    if not ctx.is_distributed:
        return array
    import paddle
    import paddle.distributed as dist
    if isinstance(array, paddle.Tensor):
        integer = not paddle.is_floating_point(array)
    elif np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
        integer = np.issubdtype(array.dtype, np.integer)
    else:
        raise TypeError(f"all_reduce_sum needs a float or integer array, got {array.dtype}")
    wide = "int64" if integer else "float64"
    if len(array.shape) == 0:
        if isinstance(array, paddle.Tensor):
            piece = array.reshape([1]).astype(wide)
            _collective("a sum over the ranks", dist.all_reduce, piece)
            paddle.assign(piece.reshape([]).astype(array.dtype), output=array)
        else:
            all_reduce_sum(array.reshape(1), chunk_bytes)   # a view: writes through
        return array
    row_bytes = 8 * int(np.prod(array.shape[1:], dtype=np.int64))
    for start, stop in _row_chunks(array.shape[0], row_bytes, chunk_bytes):
        if isinstance(array, paddle.Tensor):
            piece = array[start:stop].astype(wide)
        else:
            piece = paddle.to_tensor(np.ascontiguousarray(array[start:stop], dtype=wide))
        _collective("a sum over the ranks", dist.all_reduce, piece)
        if isinstance(array, paddle.Tensor):
            array[start:stop] = piece.astype(array.dtype)
        else:
            array[start:stop] = piece.numpy()
    return array


def sum_count(count: int) -> int:
    """An integer (e.g. the number of images) summed over all ranks, exactly."""
    return int(all_reduce_sum(np.array([count], dtype=np.int64))[0])


def pooled_shift(count: int, shift: np.ndarray, centred_sum: np.ndarray) -> np.ndarray:
    """The mean of all ranks' embeddings [P, d] float64, from each rank's own ``count``, ``shift``
    [P, d] and Σ(x - shift) [P, d]: Σ_r (n_r·shift_r + Σ(x - shift_r)) / Σ_r n_r. Recentring
    every rank's sums on this one shift makes them addable (and keeps them near zero). Every
    rank needs at least one image (its shift is undefined otherwise)."""
    if count < 1:
        raise ValueError("every rank needs at least one image to take part in the fit")
    total = sum_count(count)
    pooled = count * np.asarray(shift, dtype=np.float64) + np.asarray(centred_sum, dtype=np.float64)
    return all_reduce_sum(pooled) / total


_DTYPES = [np.dtype(name) for name in ("bool", "uint8", "int32", "int64", "float32", "float64")]
_MAX_DIMS = 8


def _describe(array: np.ndarray) -> np.ndarray:
    """[dtype code, ndim, rows, trailing dims... (-1 beyond ndim)] int64: a fixed length, so ranks
    can exchange it by collective before they allocate."""
    if array.dtype not in _DTYPES:
        raise TypeError(f"cannot send {array.dtype}; use one of {[str(d) for d in _DTYPES]}")
    if not 1 <= array.ndim <= _MAX_DIMS:
        raise ValueError(f"need 1 to {_MAX_DIMS} dimensions, got shape {array.shape}")
    header = np.full(2 + _MAX_DIMS, -1, dtype=np.int64)
    header[0], header[1] = _DTYPES.index(array.dtype), array.ndim
    header[2:2 + array.ndim] = array.shape
    return header


def _wire(array: np.ndarray) -> np.ndarray:
    """What goes through the collective: bool as uint8 (the same bytes), contiguous."""
    return np.ascontiguousarray(array).view(np.uint8) if array.dtype == np.bool_ else np.ascontiguousarray(array)


def _unwire(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return array.view(np.bool_) if dtype == np.bool_ else array


def gather_to_rank0(arrays: dict[str, np.ndarray], total: int,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, np.ndarray] | None:
    """Per-item arrays of each rank's ``shard`` of ``total`` items -> on rank 0, the arrays of
    all items in the original order (None on the other ranks).

    ``arrays``: the same keys on every rank, each [k_r, ...] with k_r = ``shard_size(total,
    rank, world)`` and the same dtype and trailing shape on every rank, e.g. {"scores": [k]
    float32, "labels": [k] int64, "maps": [k, H, W] float32, "masks": [k, H, W] bool}. See
    ``gather_indexed_to_rank0``. Call it right after a ``step``. Without the launcher: the
    arrays as given."""
    ctx = context()
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    expected = shard_size(total, ctx.rank, ctx.world_size)
    for key, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != expected:
            raise ValueError(f"{key}: rank {ctx.rank} of {ctx.world_size} holds {expected} of {total} items, "
                             f"but the array has shape {value.shape}")
    if not ctx.is_distributed:
        return arrays
    gathered = gather_indexed_to_rank0(arrays, shard(range(total), ctx.rank, ctx.world_size), chunk_bytes=chunk_bytes)
    return None if gathered is None else gathered[0]


def gather_indexed_to_rank0(arrays: dict[str, np.ndarray], indices: Sequence[int], axis: int = 0,
                            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """Items that each rank holds, any number per rank, tagged with their (distinct) index in a
    list all ranks share -> on rank 0, (arrays of all ranks' items sorted by index, the sorted
    indices [K] int64); None on the other ranks.

    ``arrays``: the same keys on every rank, the items along ``axis`` (k_r = len(``indices``) of
    them), the same dtype and other dimensions on every rank, e.g. the embeddings [P, k_r, d]
    (``axis=1``) of the training images a rank kept. They travel by point-to-point sends to rank
    0, in rounds of at most ``chunk_bytes`` per rank, so no rank waits in a send for longer than
    a round and no rank holds more than its items and a round beyond them (rank 0: the result).
    Call it right after a ``step``, on every rank. Without the launcher: the arrays sorted by
    index."""
    ctx = context()
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    arrays = {key: np.moveaxis(np.asarray(value), axis, 0) for key, value in arrays.items()}   # views
    for key, value in arrays.items():
        if value.shape[0] != len(indices):
            raise ValueError(f"{key}: {value.shape[0]} items along axis {axis}, but {len(indices)} indices")
    if not ctx.is_distributed:
        order = np.argsort(indices, kind="stable")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("the item indices repeat")
        return {key: np.moveaxis(value[order], 0, axis) for key, value in arrays.items()}, indices[order]
    import paddle
    import paddle.distributed as dist
    what = "the gather of per-item results"
    keys = sorted(arrays)
    # first the key list (a fixed-size tensor, so a mismatch is an error, not a hang), then dtypes
    # and the other dimensions
    names = np.array([len(keys), zlib.crc32("\0".join(keys).encode("utf-8"))], dtype=np.int64)
    _same_everywhere(what, names, f"ranks disagree on the arrays to gather (this rank: {keys})")
    if keys:
        layout = np.stack([_describe(arrays[key][:0]) for key in keys])   # no rows: those differ by rank
        _same_everywhere(what, layout, f"ranks disagree on the dtype or the other dimensions of {keys}")
    counts = []
    _collective(what, dist.all_gather, counts, paddle.to_tensor(np.array([len(indices)], dtype=np.int64)))
    counts = [int(count.numpy()[0]) for count in counts]
    senders = [rank for rank in range(1, ctx.world_size) if counts[rank] > 0]
    everyone = {0: indices}
    for sender in senders:   # the indices first: they say where each item goes
        if ctx.rank == sender:
            _collective(what, dist.send, paddle.to_tensor(indices), dst=0)
        elif ctx.rank == 0:
            buffer = paddle.to_tensor(np.empty(counts[sender], np.int64))
            _collective(what, dist.recv, buffer, src=sender)
            everyone[sender] = buffer.numpy()
    if ctx.rank == 0:
        merged_indices = np.sort(np.concatenate([everyone[rank] for rank in sorted(everyone)]))
        if len(np.unique(merged_indices)) != len(merged_indices):
            raise ValueError("the item indices repeat across ranks")
        places = {rank: np.searchsorted(merged_indices, rank_indices) for rank, rank_indices in everyone.items()}
    gathered = {}
    for key in keys:
        local = arrays[key]
        wire_dtype = np.uint8 if local.dtype == np.bool_ else local.dtype
        row_bytes = max(1, np.dtype(wire_dtype).itemsize * int(np.prod(local.shape[1:], dtype=np.int64)))
        rows_per_round = max(1, chunk_bytes // row_bytes)
        if ctx.rank == 0:
            merged = np.empty((len(merged_indices),) + local.shape[1:], local.dtype)
            merged[places[0]] = local
        for start in range(0, max(counts), rows_per_round):
            for sender in senders:
                stop = min(start + rows_per_round, counts[sender])
                if stop <= start:
                    continue
                if ctx.rank == sender:
                    _collective(what, dist.send, paddle.to_tensor(_wire(local[start:stop])), dst=0)
                elif ctx.rank == 0:
                    buffer = paddle.to_tensor(np.empty((stop - start,) + local.shape[1:], wire_dtype))
                    _collective(what, dist.recv, buffer, src=sender)
                    merged[places[sender][start:stop]] = _unwire(buffer.numpy(), local.dtype)
        if ctx.rank == 0:
            gathered[key] = np.moveaxis(merged, 0, axis)
    return (gathered, merged_indices) if ctx.rank == 0 else None


def _same_everywhere(what: str, values: np.ndarray, mismatch: str) -> None:
    import paddle
    import paddle.distributed as dist
    everyone = []
    _collective(what, dist.all_gather, everyone, paddle.to_tensor(values))
    if any(not np.array_equal(other.numpy(), values) for other in everyone):
        raise DataError(mismatch)


def broadcast_from_rank0(array: np.ndarray | None) -> np.ndarray:
    """Rank 0's array (e.g. thresholds, the score range the figures share) on every rank, at
    least 1-D; the others pass None. Call it right after a ``step``. Without the launcher: the
    array."""
    ctx = context()
    if not ctx.is_distributed:
        return np.atleast_1d(np.asarray(array))
    import paddle
    import paddle.distributed as dist
    what = "a broadcast from rank 0"
    if ctx.rank == 0:
        original = np.atleast_1d(np.asarray(array))
        header = _describe(original)
    else:
        header = np.zeros(2 + _MAX_DIMS, dtype=np.int64)
    header_tensor = paddle.to_tensor(header)
    _collective(what, dist.broadcast, header_tensor, src=0)
    header = header_tensor.numpy()
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    shape = tuple(int(n) for n in header[2:2 + ndim])
    wire = _wire(original) if ctx.rank == 0 else np.empty(shape, np.uint8 if dtype == np.bool_ else dtype)
    payload = paddle.to_tensor(wire)
    _collective(what, dist.broadcast, payload, src=0)
    return _unwire(payload.numpy(), dtype)
