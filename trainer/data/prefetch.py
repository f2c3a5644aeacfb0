"""Builds the next batches of an iterator ahead of the step, on a background thread.

Generating one synthetic batch of 2048 samples takes ~5 ms (single-hot; ~20 ms
with 178 ids per sample, ~25 ms with variable bags) on one CPU thread;
inside the step it is on the critical path, and the step waits for it. A
:class:`Prefetcher` runs the source iterator on one producer thread and keeps up
to ``depth`` finished items in a bounded queue, so the step only dequeues.
torch's kernels release the GIL, so the producer's tensor work overlaps the
step's forward/backward and its collectives (the gloo/NCCL waits are where a
saturated CPU has room).

Guarantees:

- the same items in the same order as the wrapped iterator (one producer, one
  FIFO queue), so a seeded source stays deterministic;
- an exception raised by the source (or ``transform``) is raised by ``next()``
  in the consumer, at the position where it occurred, with its traceback;
- ``close()`` (or leaving the ``with`` block, or garbage collection) stops the
  producer and joins it, also when the consumer stops early; the producer never
  blocks forever on a full queue.

The trainer's input (``trainer.prefetch``) goes through :func:`input_ahead`: on a
GPU fed from host memory (prepared shards) the batches are built ``depth`` ahead
and copied into pinned (page-locked) memory on the producer thread, so that the
train pipeline's ``non_blocking`` host-to-device copy really runs in the
background; everywhere else (the CPU, where the 2 cores have no room for a
producer, and batches already on the GPU) they stay inline unless asked for.

Example::

    batches = source.train_batches(batch_size=2048, rank=r, world_size=w,
                                   first_step=0, num_steps=1000)
    with Prefetcher(batches, depth=2) as prefetched:
        for batch in prefetched:
            train_step(batch)

    with input_ahead(batches, mode="auto", device=torch.device("cuda")) as ahead:
        for batch in ahead:   # pinned host batches, two ahead of the step
            train_step(batch)
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
_POLL_S = 0.05


class _Done:
    pass


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterates ``iterable`` on a daemon thread, ``depth`` items ahead of the consumer.

    ``transform`` (e.g. a host-to-device copy) runs on the producer thread too.
    ``num_threads``, when given, is applied with ``torch.set_num_threads`` on the
    producer thread, so that generation does not oversubscribe the cores.
    """

    def __init__(
        self,
        iterable: Iterable[T],
        *,
        depth: int = 2,
        transform: Callable[[T], T] | None = None,
        num_threads: int | None = None,
        name: str = "shardrec-prefetch",
    ) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher depth={depth} must be >= 1")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._source = iter(iterable)
        self._transform = transform
        self._num_threads = num_threads
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        """Puts ``item``, waking up now and then to honour ``close()``."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        if self._num_threads is not None:
            import torch

            torch.set_num_threads(self._num_threads)
        try:
            for item in self._source:
                if self._transform is not None:
                    item = self._transform(item)
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failed(error))
            return
        self._put(_Done())

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Done):
            self._finish()
            raise StopIteration
        if isinstance(item, _Failed):
            self._finish()
            raise item.error
        return item  # type: ignore[return-value]

    def _finish(self) -> None:
        self._finished = True
        self._thread.join()

    def close(self) -> None:
        """Stops the producer and waits for it (idempotent)."""
        self._finished = True
        self._stop.set()
        # Unblock a producer waiting on a full queue, then drop what it made.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        close_source = getattr(self._source, "close", None)
        if close_source is not None and not self._thread.is_alive():
            close_source()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self._stop.set()


PREFETCH_MODES = ("auto", "on", "off")


def _in_host_memory(batch: Any) -> bool:
    return batch.dense_features.device.type == "cpu"


def _pinned(batch: Any) -> Any:
    """``batch`` in page-locked memory (a host batch; a device batch as it is)."""
    return batch.pin_memory() if _in_host_memory(batch) else batch


@contextlib.contextmanager
def input_ahead(
    batches: Iterator[Any], *, mode: str, device: torch.device, depth: int = 2
) -> Iterator[Iterator[Any]]:
    """``batches`` as the train step reads them (see the module docstring).

    ``mode``: ``auto`` prefetches, pinned, when ``device`` is a GPU and the batches
    are in host memory (the first batch says; it is read here), else leaves them
    inline; ``on`` always prefetches (pinned for a GPU); ``off`` never. The same
    batches in the same order either way; the producer is stopped on leaving.
    """
    if mode not in PREFETCH_MODES:
        raise ValueError(f"trainer.prefetch={mode!r}; use one of {PREFETCH_MODES}")
    gpu = device.type == "cuda"
    if mode == "auto":
        first = next(batches, None)
        if first is None:
            yield iter(())
            return
        batches = itertools.chain([first], batches)
        mode = "on" if gpu and _in_host_memory(first) else "off"
    if mode == "off":
        yield batches
        return
    with Prefetcher(batches, depth=depth, transform=_pinned if gpu else None) as ahead:
        yield ahead
