"""Micro-batching of concurrent searches: the photos of every request that is waiting go through the
network together, then one index scan answers them all."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future


class Batcher:
    """Collects concurrent search requests (up to ``max_batch``, waiting at most ``wait`` seconds
    after the first, ``busy_wait`` when the previous call answered more than one request: under
    load the others are on their way) and answers them with one call of ``run(items, ks)``
    (``items``: what each request submitted, in order)."""

    def __init__(self, run, max_batch: int = 32, wait: float = 0.002, busy_wait: float | None = None,
                 name: str = "lookalike-batcher"):
        self.run, self.max_batch, self.wait = run, max_batch, wait
        self.busy_wait = wait if busy_wait is None else busy_wait
        self.last_size = 0
        self.queue: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, item, k: int) -> Future:
        fut: Future = Future()
        self.queue.put((item, k, fut))
        return fut

    _STOP = object()

    def close(self) -> None:
        """Stop the loop (requests already queued are answered first)."""
        self.queue.put((self._STOP, 0, None))

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first[0] is self._STOP:
                return
            batch = [first]
            deadline = time.monotonic() + (self.busy_wait if self.last_size > 1 else self.wait)
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item[0] is self._STOP:
                    self.queue.put(item)  # stop after this batch
                    break
                batch.append(item)
            self.last_size = len(batch)
            try:
                results = self.run([b[0] for b in batch], [b[1] for b in batch])
                for (_, _, fut), res in zip(batch, results):
                    fut.set_result(res)
            except BaseException as e:  # every waiting request gets the error, the loop goes on
                for _, _, fut in batch:
                    fut.set_exception(e)
