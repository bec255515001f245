"""The one thread that owns the model: it batches waiting requests and streams their pieces back.

The event loop never touches the model: a request handler puts a :class:`Job` on a bounded
queue and awaits its events. The worker takes the first waiting job, lets more join for a
few milliseconds (up to the batch size), checks each on its own (so one bad request is
refused alone instead of failing its batch), and runs the good ones as one batched
generation, handing every :class:`~chiasm.generation.Delta` to its job's event loop. Other
model work (``/v1/explain``) goes through the same queue as a :class:`Call`, so two
computations never share the model at once.

A client that goes away cancels its job: a job still queued is skipped; a job in a running
batch stops receiving pieces, and the batch ends early once every job left in it is cancelled
(the engine runs a batch as one unit, so a row cannot leave it alone).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from chiasm.generation import Engine, Request, RequestError
from chiasm.generation.checks import prepare
from chiasm.serve.errors import ApiError

log = logging.getLogger(__name__)


@dataclass
class Item:
    """Something queued for the model thread, with the event loop its answer goes back to."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event: Any) -> None:
        """Hand ``event`` to the waiting handler (from the model thread); a closed loop has no one waiting."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Job(Item):
    """One chat completion. ``max_tokens`` None: as many as ``default_max_tokens`` and the context allow.

    Events: :class:`Delta` pieces, the last one ``finished``; or one :class:`ApiError`.
    """

    request: Request | None = None
    max_tokens: int | None = None


@dataclass
class Call(Item):
    """A function to run on the model thread; its one event is its result or the exception it raised."""

    fn: Callable[[], Any] | None = None


class ModelWorker:
    """Owns ``engine`` (and its model) on a daemon thread; :meth:`submit` from any thread."""

    def __init__(self, engine: Engine, *, max_batch_size: int, max_queue: int, batch_wait_ms: float,
                 default_max_tokens: int) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.default_max_tokens = default_max_tokens
        self.queue: queue.Queue[Item | None] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chiasm-model", daemon=True)
        self.busy = 0  # jobs in the batch now running

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, item: Item) -> None:
        """Queue ``item``, or refuse: 429 while the queue is full, 503 once the worker has stopped."""
        if not self.alive:
            raise ApiError(503, "the model worker is not running; the server is shutting down or failed",
                           code="unavailable")
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.queue.maxsize} requests are already waiting; "
                                "retry shortly", code="queue_full", headers={"Retry-After": "1"}) from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, refuse what is still queued, and wait for the running batch to end."""
        self._stop.set()
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.send(ApiError(503, "the server is shutting down", code="unavailable"))
        try:
            self.queue.put_nowait(None)  # wakes the thread if it waits for work
        except queue.Full:
            pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the model thread ------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self.queue.get()
            if first is None or self._stop.is_set():
                break
            if isinstance(first, Call):
                self._call(first)
                continue
            jobs, calls = self._gather(first)
            try:
                self._run(jobs)
            except Exception:  # a bug or an out-of-memory: this batch fails, the server goes on
                log.exception("generation failed for a batch of %d request(s)", len(jobs))
                for job in jobs:
                    job.send(ApiError(500, "generation failed inside the server (see its log)",
                                      code="internal_error"))
            finally:
                self.busy = 0
            for call in calls:
                self._call(call)

    def _gather(self, first: Job) -> tuple[list[Job], list[Call]]:
        """``first`` and the jobs that arrive within the batch wait, up to the batch size."""
        jobs, calls = [first], []
        deadline = time.monotonic() + self.batch_wait
        while len(jobs) < self.max_batch_size:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            (calls if isinstance(item, Call) else jobs).append(item)
        return jobs, calls

    def _call(self, call: Call) -> None:
        if call.cancelled.is_set():
            return
        try:
            call.send(call.fn())
        except Exception as exc:  # handed to the handler, which decides what the client sees
            call.send(exc)

    def _checked(self, job: Job) -> bool:
        """Fit the job's token budget to the context and check it; a refusal goes to that job alone."""
        try:
            if job.max_tokens is None:  # as many as the default and the context allow: fits by construction
                probe = replace(job.request, params=replace(job.request.params, max_new_tokens=1))
                prompt = len(prepare(probe, self.engine.processor, self.engine.context).input_ids)
                job.request.params.max_new_tokens = min(self.default_max_tokens, self.engine.context - prompt)
            else:
                self.engine.validate(job.request)
            return True
        except RequestError as exc:
            job.send(ApiError(400, str(exc), code="invalid_request"))
        except Exception:  # a bug met by this request only: the rest of its batch still runs
            log.exception("checking a request failed")
            job.send(ApiError(500, "checking the request failed inside the server (see its log)",
                              code="internal_error"))
        return False

    def _run(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.cancelled.is_set() and self._checked(job)]
        if not live:
            return
        self.busy = len(live)
        done = [False] * len(live)
        stream = self.engine.stream([job.request for job in live])
        try:
            for delta in stream:
                job = live[delta.index]
                if not job.cancelled.is_set():
                    job.send(delta)
                done[delta.index] = delta.finished
                if all(d or j.cancelled.is_set() for d, j in zip(done, live, strict=True)):
                    break  # nobody is left to read the rest
        finally:
            stream.close()
        for job, finished in zip(live, done, strict=True):
            if not finished and not job.cancelled.is_set():  # the engine's promise of a finished Delta, kept
                job.send(ApiError(500, "generation ended without finishing this request", code="internal_error"))
