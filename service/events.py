"""Live study events: an in-process broadcaster between the scheduler thread and SSE streams.

The scheduler calls its hooks (``hook(study_id, event)``) on its own thread; a
:class:`EventBroker` registered as one of them hands each event to every subscriber of that
study. A subscriber belongs to one asyncio loop (the server's) and owns a bounded queue; the
broker never touches the queue from the scheduler thread, it schedules the put on the loop
with ``call_soon_threadsafe``. A subscriber too slow to keep up is marked ``overflowed`` and
its stream ends with a ``resync`` event (the dashboard then re-reads the trials it missed):
the scheduler is never held up by a reader.

:func:`sse_stream` turns a subscription into ``text/event-stream`` chunks: one ``event:`` per
scheduler event (``trial_started``, ``trial_report``, ``trial_finished``, ``trial_retry``,
``study``), a comment every ``keepalive_s`` so proxies keep the connection, and the end of the
stream once the study is finished.

A stream ends too when the server shuts down (:meth:`EventBroker.close`, called when uvicorn
is told to exit): uvicorn waits for open responses before it runs the lifespan's drain, and
an event stream never ends by itself.

Events exist only in the process that runs the scheduler; a deployment with a separate
``tsam scheduler`` process gets keep-alives only, and the dashboard's polling covers it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tsam.events")

EVENT_NAMES = ("trial_started", "trial_report", "trial_finished", "trial_retry", "study")
FINISHED_STATUSES = frozenset({"completed", "cancelled", "failed"})
DEFAULT_KEEPALIVE_S = 15.0
DEFAULT_QUEUE_SIZE = 10_000


@dataclass(eq=False)
class Subscription:
    """One reader of one study's events, bound to the asyncio loop it was made on."""

    study_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]]
    overflowed: bool = False
    closed: bool = False
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _deliver(self, event: dict[str, Any]) -> None:
        # Runs on ``loop``: the only place the queue is written.
        if self.closed or self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            # Wake the reader so it notices at once.
            self.queue.get_nowait()
            self.queue.put_nowait({"type": "resync"})

    async def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


class EventBroker:
    """Fans scheduler events out to subscribers; :meth:`publish` is safe from any thread."""

    def __init__(
        self, *, keepalive_s: float = DEFAULT_KEEPALIVE_S, queue_size: int = DEFAULT_QUEUE_SIZE
    ) -> None:
        if keepalive_s <= 0:
            raise ValueError(f"keepalive_s must be > 0, got {keepalive_s!r}")
        if queue_size < 2:
            raise ValueError(f"queue_size must be >= 2, got {queue_size!r}")
        self.keepalive_s = keepalive_s
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}
        self.closed = False
        _BROKERS.add(self)

    def subscribe(self, study_id: str) -> Subscription:
        """A new subscription on the running loop (call from async code)."""
        sub = Subscription(
            study_id, asyncio.get_running_loop(), asyncio.Queue(maxsize=self.queue_size)
        )
        with self._lock:
            self._subs.setdefault(study_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        with self._lock:
            subs = self._subs.get(sub.study_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.study_id]

    def subscribers(self, study_id: str) -> int:
        with self._lock:
            return len(self._subs.get(study_id, ()))

    def publish(self, study_id: str, event: dict[str, Any]) -> None:
        """Hand ``event`` to every subscriber of ``study_id`` (the scheduler hook)."""
        with self._lock:
            subs = list(self._subs.get(study_id, ()))
        payload = dict(event)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._deliver, payload)
            except RuntimeError:  # the loop closed under us: the reader is gone
                self.unsubscribe(sub)

    __call__ = publish

    def close(self) -> None:
        """End every stream (server shutdown); safe from any thread, idempotent."""
        self.closed = True
        with self._lock:
            subs = [sub for group in self._subs.values() for sub in group]
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._deliver, {"type": "shutdown"})
            except RuntimeError:
                self.unsubscribe(sub)


_BROKERS: weakref.WeakSet[EventBroker] = weakref.WeakSet()


def close_all() -> None:
    """Close every broker of this process."""
    for broker in list(_BROKERS):
        broker.close()


def end_streams_on_server_exit() -> None:
    """Make uvicorn's exit signal (SIGTERM, Ctrl-C) close the brokers first, so open event
    streams end and uvicorn goes on to the lifespan's drain instead of waiting on them."""
    try:
        from uvicorn.server import Server
    except ImportError:  # pragma: no cover - uvicorn is a dependency
        return
    original = Server.handle_exit
    if getattr(original, "_closes_event_streams", False):
        return

    def handle_exit(self: Server, sig: int, frame: Any) -> None:
        close_all()
        original(self, sig, frame)

    handle_exit._closes_event_streams = True  # type: ignore[attr-defined]
    Server.handle_exit = handle_exit  # type: ignore[method-assign]


def format_event(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One server-sent event."""
    lines = [f"event: {name}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'), allow_nan=False)}")
    return "\n".join(lines) + "\n\n"


async def sse_stream(
    broker: EventBroker,
    sub: Subscription,
    study_status: Callable[[], Awaitable[str | None]],
) -> AsyncIterator[str]:
    """The event stream of ``sub``'s study until the study finishes (or vanishes).

    ``study_status`` reads the study's stored status; it is asked once at the start (a finished
    study answers with its ``study`` event at once) and at every keep-alive, so a study that
    finished without an event reaching this process (another process cancelled it) still ends
    the stream.
    """
    try:
        yield "retry: 3000\n: connected\n\n"
        if broker.closed:
            return
        status = await study_status()
        if status is None or status in FINISHED_STATUSES:
            yield format_event("study", {"type": "study", "status": status or "deleted"})
            return
        while True:
            event = await sub.get(broker.keepalive_s)
            if event is None:
                status = await study_status()
                if status is None or status in FINISHED_STATUSES:
                    yield format_event("study", {"type": "study", "status": status or "deleted"})
                    return
                yield ": keep-alive\n\n"
                continue
            name = str(event.get("type", "message"))
            if name == "shutdown":
                return
            if name == "resync":
                yield format_event("resync", {"type": "resync"})
                return
            yield format_event(name, event, next(sub.ids))
            if name == "study" and event.get("status") in FINISHED_STATUSES:
                return
    finally:
        broker.unsubscribe(sub)
