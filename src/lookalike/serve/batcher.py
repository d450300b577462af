"""Micro-batching of concurrent searches: the photos of every request that is waiting go through the
network together, then one index scan answers them all."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future


class Batcher:
    """Collects concurrent search requests and answers them with one call of ``run(items, ks)``
    (``items``: what each request submitted, in order).

    After the first request it gathers until as many are here as are expected, at most
    ``busy_wait`` seconds, then takes whatever else is queued (a lone request goes at once).
    Expected: as many as the previous call answered (clients in a closed loop come back together:
    they missed the next call by a few ms and paid a whole extra call when it only waited a fixed
    2 ms) or as many as ``expected()`` says are on their way (the server counts the requests that
    have begun and not been answered), whichever is more; at most ``max_batch``. ``busy_wait``
    30 ms: with 8 clients on 2 cores, 15 ms let a slow client miss its group about once in 50
    searches (it then paid a whole extra call, ~90 ms); 30 ms brought the steady p99 from ~150 to
    ~115 ms. A client that does not come back costs one call 30 ms (the next expects fewer).
    """

    def __init__(self, run, max_batch: int = 32, busy_wait: float = 0.03, expected=None, name: str = "lookalike-batcher"):
        self.run, self.max_batch, self.busy_wait = run, max_batch, busy_wait
        self.expected = expected or (lambda: 0)
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
            start = time.monotonic()
            while len(batch) < self.max_batch:
                expect = min(self.max_batch, max(self.last_size, self.expected()))
                try:
                    if len(batch) >= expect:
                        item = self.queue.get_nowait()  # all expected are here: only what is already queued
                    else:
                        item = self.queue.get(timeout=max(0.0, start + self.busy_wait - time.monotonic()))
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
