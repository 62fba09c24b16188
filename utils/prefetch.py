"""An iterator drained by a background thread, so that its work starts before the consumer asks.

infer.py starts decoding the first batches this way before it builds the runtime: loading
Paddle Inference and its parameters leaves a core free, and the first batch is then waiting
when the predictor is ready.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

_DONE = object()


class Prefetched:
    """Iterate ``items`` in a daemon thread, ``depth`` items ahead of the consumer.

    Items come out in order; an exception raised by ``items`` is raised by ``next`` at the
    point it happened. ``close()`` (also on leaving a ``with`` block, and when the consumer
    stops early) stops the thread after its current item and closes ``items`` in that thread,
    so a generator's ``finally`` and ``with`` blocks run.
    """

    def __init__(self, items: Iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._drain, args=(iter(items),), name="padim-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        """Hand ``item`` over unless the consumer has gone; False once it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _drain(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put((item, None)):
                    break
            else:
                self._put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((_DONE, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item, error = self._queue.get()
        if item is _DONE:
            self._finished = True
            self._thread.join()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (after the item it is producing) and wait for it."""
        self._finished = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetched":
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self.close()
        return False
