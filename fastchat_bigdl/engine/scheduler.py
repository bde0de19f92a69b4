"""One thread owns the model: it loads it, then runs every stream's token loop, putting
the decode steps of all active streams into one batched call (continuous batching).

Why one thread: measured on a 2-core Xeon (AVX-512/AMX), a model loaded on one thread and
run on another decodes ~1/3 slower (the OpenMP thread teams made while converting belong
to the loading thread), and kernels run from a second thread slow every later step.

Each turn of the loop: run the queued calls (loading, building the runner); start new
streams; advance every active token loop to its next request (``engine.requests``),
queueing the output chunks it yields for its client; grant KV reservations the budget
has room for (``engine.kv_budget``; the others wait); then one batched ``decode`` for all
decode requests, each ``Compute`` alone, and layers of one waiting prefill block for about
as long as that decode step took (``LlamaRunner.prefill_block_steps``), so a long prompt
delays the decoding streams by about one step per turn instead of freezing them; with
nobody decoding, whole blocks.
Requests join between turns; a stream whose client went away is closed at the next turn,
on this thread, so its cleanup (the prefix cache) runs here too.

``Engine(inline=True)`` has no thread: the caller's thread runs the same turns while it
reads a stream's chunks (in-process generation: ``bench --profile``, tests), so there is
one driver of the token-loop protocol, the one the worker serves with.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Deque, Iterator, List, Optional

import torch

from fastchat_bigdl.engine.llama_runner import LlamaRunner
from fastchat_bigdl.engine.kv_budget import KVBudget, NeverFits, Reservation
from fastchat_bigdl.engine.requests import REQUESTS, Compute, Decode, Prefill, Reserve

logger = logging.getLogger(__name__)
_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stream:
    """One token loop and its client's queue of output chunks."""

    def __init__(self, make: Callable[[], Iterator], batched: bool):
        self.make, self.batched = make, batched
        self.loop: Optional[Iterator] = None
        self.out: "queue.SimpleQueue" = queue.SimpleQueue()
        self.request = None  # what the loop waits for
        self.reply = None  # what it gets next
        self.cancelled = False
        self.logits_parts: List = []  # a prefill split over turns
        self.block: Optional[Iterator] = None  # the prefill block under way (``prefill_block_steps``)
        self.block_is_last = False


class Engine:
    def __init__(self, name: str = "model", runner: Optional[LlamaRunner] = None, inline: bool = False):
        self.runner = runner
        self.kv_budget: Optional[KVBudget] = None  # None: reservations are granted at once
        self._wake = threading.Condition()
        self._calls: Deque = deque()
        self._new: Deque[_Stream] = deque()
        self._active: List[_Stream] = []
        self.steps = self.batched_rows = 0  # decode calls and the rows they carried
        self._thread = None if inline else threading.Thread(target=self._run, name=name, daemon=True)
        if self._thread is not None:
            self._thread.start()

    @property
    def active_streams(self) -> int:
        return len(self._active)

    # --- client side (any thread) --------------------------------------------------

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the engine thread; its result or its exception here."""
        if self._thread is None:
            return fn(*args, **kwargs)
        future: Future = Future()
        with self._wake:
            self._calls.append((future, fn, args, kwargs))
            self._wake.notify()
        return future.result()

    def streamer(self, make_loop: Callable[..., Iterator], batched: bool = True) -> Callable[..., Iterator]:
        """A function with ``make_loop``'s signature whose token loop runs on the engine
        thread; calling it returns the loop's output chunks. ``batched=False`` for plain
        generators that call the model themselves (stepped one chunk per turn)."""

        def stream(*args, **kwargs):
            return self._consume(_Stream(lambda: make_loop(*args, **kwargs), batched))

        stream.__name__ = getattr(make_loop, "__name__", "stream")
        return stream

    def _consume(self, stream: _Stream) -> Iterator:
        """The client's side of a stream: its chunks as the loop yields them. Inline, the
        caller's thread runs the engine's turns until the stream has a chunk for it."""
        inline = self._thread is None
        with self._wake:
            (self._active if inline else self._new).append(stream)
            self._wake.notify()
        try:
            while True:
                while inline and stream.out.empty():
                    self._safe_turn()
                item = stream.out.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:  # finished, failed, or the client went away
            if inline and stream in self._active:
                self._close(stream)
                self._active.remove(stream)
            stream.cancelled = True  # the engine closes the loop on its thread at its next turn
            with self._wake:
                self._wake.notify()

    # --- engine thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._calls or self._new or self._active):
                    self._wake.wait()
                calls, self._calls = list(self._calls), deque()
                new, self._new = list(self._new), deque()
            for future, fn, args, kwargs in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)
            self._active.extend(new)
            self._safe_turn()

    def _safe_turn(self) -> None:
        try:
            self._turn()
        except BaseException as exc:  # noqa: BLE001 - a bug here must not hang every client
            logger.exception("engine turn failed; failing its %d streams and serving on", len(self._active))
            for stream in list(self._active):
                self._close(stream)
                self._finish(stream, _Failure(exc))

    @staticmethod
    def _close(stream: _Stream) -> None:
        """Close a loop (its cleanup runs here); a loop failing to close is only logged.
        A reservation granted but not yet delivered to the loop is given back here."""
        if isinstance(stream.reply, Reservation):
            stream.reply.release()
        if stream.loop is not None:
            try:
                stream.loop.close()
            except BaseException:  # noqa: BLE001
                logger.exception("closing a stream's loop failed")

    def _finish(self, stream: _Stream, item=_END) -> None:
        stream.out.put(item)
        self._active.remove(stream)

    def _advance(self, stream: _Stream) -> None:
        """Run ``stream``'s loop up to its next request (or one chunk, for plain generators)."""
        try:
            if stream.loop is None:
                stream.loop = stream.make()
                item = next(stream.loop)
            else:
                reply, stream.reply = stream.reply, None
                item = stream.loop.send(reply)
            while not isinstance(item, REQUESTS):
                stream.out.put(item)
                if not stream.batched:
                    return
                item = next(stream.loop)
            stream.request = item
        except StopIteration:
            self._finish(stream)
        except BaseException as exc:  # noqa: BLE001 - the client raises it
            self._finish(stream, _Failure(exc))

    def _fail(self, stream: _Stream, exc: BaseException) -> None:
        """The model call ``stream`` waited for failed: raise it inside the loop (its own
        cleanup runs), and hand whatever comes out to the client."""
        stream.request = None
        try:
            stream.loop.throw(exc)
        except StopIteration:
            self._finish(stream)
        except BaseException as raised:  # noqa: BLE001
            self._finish(stream, _Failure(raised))
        else:  # the loop caught it and yielded again: it does not get another turn
            self._close(stream)
            self._finish(stream, _Failure(exc))

    def _turn(self) -> None:
        for stream in list(self._active):
            if stream.cancelled:
                self._close(stream)
                self._active.remove(stream)
            elif stream.request is None:
                self._advance(stream)
        waiting = [s for s in self._active if s.request is not None]
        self._grant_reservations([s for s in waiting if isinstance(s.request, Reserve)])
        for stream in [s for s in waiting if isinstance(s.request, Compute)]:
            self._answer([stream], lambda: [stream.request.fn()])
        decodes = [s for s in waiting if isinstance(s.request, Decode)]
        slice_seconds = float("inf")  # nobody decoding: nobody waits for the prefill
        if decodes:
            self.steps += 1
            self.batched_rows += len(decodes)
            started = time.perf_counter()
            self._answer(decodes, lambda: self._decode_rows(decodes))
            slice_seconds = time.perf_counter() - started
        prefill = next((s for s in waiting if isinstance(s.request, Prefill) and s.block is not None), None)
        prefill = prefill or next((s for s in waiting if isinstance(s.request, Prefill)), None)
        if prefill is not None:
            self._prefill_layers(prefill, slice_seconds)

    def _grant_reservations(self, streams: List[_Stream]) -> None:
        """In arrival order, until one does not fit (those behind it wait too, so a large
        request is not starved by smaller ones); one that never fits fails in its loop."""
        budget = self.kv_budget
        for stream in streams:
            request: Reserve = stream.request
            if budget is None:
                stream.request, stream.reply = None, Reservation(None, request.nbytes)
                continue
            try:
                budget.check(request.nbytes, request.what)
            except NeverFits as exc:
                self._fail(stream, exc)
                continue
            if not budget.try_reserve(request.nbytes, request.prompt):
                if not request.waited:
                    request.waited = True
                    budget.waited += 1
                return
            stream.request, stream.reply = None, Reservation(budget, request.nbytes)

    def _decode_rows(self, streams: List[_Stream]) -> list:
        logits = self.runner.decode([(s.request.token, s.request.kv) for s in streams])
        return [logits[i:i + 1] for i in range(len(streams))]

    def _answer(self, streams: List[_Stream], compute: Callable[[], list]) -> None:
        try:
            replies = compute()
        except BaseException as exc:  # noqa: BLE001 - every stream of the call gets it
            for stream in streams:
                self._fail(stream, exc)
            return
        for stream, reply in zip(streams, replies):
            stream.request, stream.reply = None, reply

    def _prefill_layers(self, stream: _Stream, seconds: float) -> None:
        """Layers of ``stream``'s current prefill block (its next block-aligned piece of
        the prompt) for at most ``seconds`` (this turn's decode step), at least one: a
        long prompt delays the decoding streams by about one step a turn. A layer is not
        started when one like the last would overrun. Answered after the last layer of
        the last block."""
        request: Prefill = stream.request
        started = time.perf_counter()
        try:
            if stream.block is None:
                room = self.runner.block_room(request.kv)
                piece, request.tokens = request.tokens[:room], request.tokens[room:]
                stream.block_is_last = not request.tokens
                stream.block = self.runner.prefill_block_steps(piece, request.kv, all_logits=request.all_logits,
                                                               next_logits=stream.block_is_last)
            while True:
                before = time.perf_counter()
                next(stream.block)
                now = time.perf_counter()
                if now - started + (now - before) > seconds:  # another layer like it would overrun
                    return
        except StopIteration as done:
            logits = done.value
        except BaseException as exc:  # noqa: BLE001
            stream.block, stream.logits_parts = None, []
            self._fail(stream, exc)
            return
        stream.block = None
        if request.all_logits:
            stream.logits_parts.append(logits)
        if not stream.block_is_last:
            return
        if request.all_logits:
            logits = torch.cat(stream.logits_parts)
            stream.logits_parts = []
        stream.request, stream.reply = None, logits
