"""One thread owns the model: it loads it and runs every step of every generation.

Measured on a 2-core Xeon (AVX-512/AMX) with the demo model, bare decode loop: loaded and
run on the same thread 25 tok/s; loaded on one thread and run on another 16.5-17 tok/s
(the OpenMP thread teams made while converting belong to the loading thread, and a
second thread's teams compete with them). FastChat runs a stream's generator in whichever
thread-pool thread Starlette picks, so the worker decoded at 0.6-0.7x the in-process
speed. Here the request threads only hand work to the model thread and wait for it.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

_DONE = object()


class ModelThread:
    def __init__(self, name: str = "model"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the model thread; its result or its exception here."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def generator(self, gen_func: Callable[..., Iterator]) -> Callable[..., Iterator]:
        """``gen_func`` whose generator is created, advanced and closed on the model thread
        (concurrent streams take turns there, chunk by chunk)."""

        @functools.wraps(gen_func)
        def stepped(*args, **kwargs):
            gen = self.call(gen_func, *args, **kwargs)
            try:
                while True:
                    item = self.call(next, gen, _DONE)
                    if item is _DONE:
                        return
                    yield item
            finally:  # also when the client went away: the generator's cleanup runs there too
                self.call(gen.close)

        return stepped
