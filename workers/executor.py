"""The executor protocol the scheduler talks to, and an in-process implementation.

An executor runs :class:`~workers.trial.TrialSpec` s with some :class:`Resources` and hands
back what happened as :class:`ExecutorEvent` s. The scheduler never blocks on it: it calls
:meth:`Executor.submit` / :meth:`Executor.cancel`, and whenever the executor calls the
``notify`` callback given to :meth:`Executor.start` (from any thread) it collects the
pending events with :meth:`Executor.drain`.

Event contract, the same for every executor (tests/workers/test_executor_conformance.py):

* per run, events arrive in order: ``started``, then ``report`` s in epoch order, then exactly
  one terminal event -- ``result``, ``failed`` or ``cancelled`` -- and nothing after it;
* ``failed`` carries ``{"error": str, "traceback": str}`` and ``retryable``: True when the
  infrastructure failed (worker process killed, node lost), False when the trial's own code
  raised (retrying would fail the same way);
* after :meth:`Executor.cancel` the only event still delivered for that run is its terminal
  one: ``cancelled``, or ``result`` if the run had already finished;
* a run is in :meth:`Executor.running` from ``submit`` until its terminal event is emitted
  (queued runs included).

:class:`InProcessExecutor` runs trials on threads of this process: quick scheduler tests and
single-process use. The product runs trials on Ray (:mod:`workers.ray_executor`).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from workers.trial import TrialSpec, run_trial

__all__ = [
    "TERMINAL_KINDS",
    "Capacity",
    "EventKind",
    "Executor",
    "ExecutorEvent",
    "InProcessExecutor",
    "Resources",
    "Runner",
]

logger = logging.getLogger(__name__)

EventKind = Literal["started", "report", "result", "failed", "cancelled"]
TERMINAL_KINDS: frozenset[str] = frozenset({"result", "failed", "cancelled"})
# What a trial runner may yield; the executor adds failed/cancelled itself.
_RUNNER_KINDS = frozenset({"started", "report", "result"})

Runner = Callable[[TrialSpec], Iterator[dict[str, Any]]]
_EPS = 1e-9


@dataclass(frozen=True)
class Resources:
    """What one trial holds while it runs. Fractions are allowed (``gpus=0.5`` shares a GPU)."""

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cpus", "gpus"):
            value = getattr(self, name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Capacity:
    """The cluster as the executor sees it. ``max_node_*``: the largest single node, so the
    largest trial that can ever be placed. Each node is
    ``{"node_id", "address", "cpus", "gpus", "alive"}``."""

    total_cpus: float
    total_gpus: float
    max_node_cpus: float
    max_node_gpus: float
    nodes: list[dict[str, Any]] = field(default_factory=list)

    def fits(self, resources: Resources) -> bool:
        """Whether one node is big enough for a trial with ``resources``."""
        return (
            resources.cpus <= self.max_node_cpus + _EPS
            and resources.gpus <= self.max_node_gpus + _EPS
        )


@dataclass(frozen=True)
class ExecutorEvent:
    """Something that happened to a run. Payloads by kind: ``started`` ``{"env"}``,
    ``report`` ``{"epoch", "metrics"}``, ``result`` ``{"metrics", "stopped", "epochs"}``,
    ``failed`` ``{"error", "traceback"}``, ``cancelled`` ``{}`` (or ``{"reason"}``)."""

    run_id: str
    kind: EventKind
    payload: dict[str, Any]
    retryable: bool = False
    #: When the executor received it (UTC): a result's time is when the trial ended, not when
    #: the scheduler got round to storing it.
    at: datetime = field(default_factory=lambda: datetime.now(UTC), compare=False)

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


@runtime_checkable
class Executor(Protocol):
    """Runs trials somewhere; see the module docstring for the event contract."""

    def start(self, notify: Callable[[], None]) -> None:
        """Get ready to run trials. ``notify()`` may be called from any thread whenever events
        are pending; it must be quick and must not call back into the executor while holding
        locks of its own that the caller of ``drain`` needs."""
        ...

    def submit(self, spec: TrialSpec, resources: Resources) -> str:
        """Queue ``spec`` to run with ``resources``; returns the new run's id at once."""
        ...

    def cancel(self, run_id: str) -> None:
        """Stop a run; it ends in ``cancelled`` (unless it already finished). Unknown or
        finished runs are ignored."""
        ...

    def drain(self) -> list[ExecutorEvent]:
        """The events emitted since the last call, oldest first."""
        ...

    def running(self) -> set[str]:
        """Runs submitted whose terminal event has not been emitted yet."""
        ...

    def capacity(self) -> Capacity: ...

    def shutdown(self) -> None:
        """Cancel what runs and release the executor's resources."""
        ...


def new_run_id(spec: TrialSpec) -> str:
    """A unique, readable run id: ``<study>-<trial>-a<attempt>-<random>``."""
    return f"{spec.study_id}-{spec.trial_number}-a{spec.attempt}-{uuid.uuid4().hex[:10]}"


def format_failure(exc: BaseException) -> dict[str, str]:
    """The ``failed`` payload for an exception raised in this process."""
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
    }


def event_from_message(run_id: str, message: Any) -> ExecutorEvent:
    """Turn a runner's dict (``{"kind": ..., ...}``) into an event; raises ValueError on
    anything a runner may not send."""
    if not isinstance(message, dict) or message.get("kind") not in _RUNNER_KINDS:
        raise ValueError(f"trial runner yielded an unexpected message: {message!r:.200}")
    payload = {k: v for k, v in message.items() if k != "kind"}
    return ExecutorEvent(run_id, message["kind"], payload)


class EventBuffer:
    """Pending events plus the per-run bookkeeping that enforces the contract: events of a run
    that already ended are dropped, and after a cancel only the terminal event gets through.
    Thread-safe; ``notify`` is called outside the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[ExecutorEvent] = []
        self._open: set[str] = set()
        self._cancelling: set[str] = set()
        self._notify: Callable[[], None] | None = None

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        with self._lock:
            self._notify = notify

    def open(self, run_id: str) -> None:
        with self._lock:
            self._open.add(run_id)

    def is_open(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._open

    def mark_cancelling(self, run_id: str) -> bool:
        """Record a cancel request; False if the run is unknown or already ended."""
        with self._lock:
            if run_id not in self._open:
                return False
            self._cancelling.add(run_id)
            return True

    def is_cancelling(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._cancelling

    def emit(self, event: ExecutorEvent) -> bool:
        """Queue ``event`` and notify; False (and nothing queued) if the contract drops it."""
        with self._lock:
            if event.run_id not in self._open:
                return False
            if not event.terminal and event.run_id in self._cancelling:
                return False
            self._events.append(event)
            if event.terminal:
                self._open.discard(event.run_id)
                self._cancelling.discard(event.run_id)
            notify = self._notify
        if notify is not None:
            try:
                notify()
            except Exception:  # a broken callback must not kill the thread that emits
                logger.exception("executor notify callback raised")
        return True

    def drain(self) -> list[ExecutorEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def running(self) -> set[str]:
        with self._lock:
            return set(self._open)


@dataclass
class _Run:
    run_id: str
    spec: TrialSpec
    resources: Resources
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class InProcessExecutor:
    """Runs trials on threads of this process, as many at a time as fit in ``slots`` CPUs and
    ``gpus`` GPUs (a trial takes its :class:`Resources`; with the default 1 CPU each, ``slots``
    trials run at once). Runs that do not fit yet wait in submission order (first fit).

    Cancel stops a run at its next event boundary (the runner's generator is closed there), so
    a runner blocked inside one long epoch finishes that epoch first. A runner that calls
    ``os._exit`` (the sleep runner's ``crash_at_epoch``) ends this whole process: crashes can
    only be simulated on Ray.
    """

    def __init__(self, slots: int = 2, gpus: float = 0.0, runner: Runner = run_trial) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        Resources(cpus=slots, gpus=gpus)  # validates gpus
        if not callable(runner):
            raise ValueError("runner must be callable")
        self._slots = slots
        self._gpus = float(gpus)
        self._runner = runner
        self._buffer = EventBuffer()
        self._lock = threading.Lock()
        self._pending: deque[_Run] = deque()
        self._active: dict[str, _Run] = {}
        self._free_cpus = float(slots)
        self._free_gpus = float(gpus)
        self._started = False
        self._closed = False

    # -- protocol ---------------------------------------------------------------------------

    def start(self, notify: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError("executor is shut down")
        self._buffer.set_notify(notify)
        self._started = True

    def submit(self, spec: TrialSpec, resources: Resources) -> str:
        if not self._started or self._closed:
            raise RuntimeError("executor is not running: call start() first")
        if not self.capacity().fits(resources):
            raise ValueError(
                f"{resources} can never fit this executor ({self._slots} cpus, {self._gpus} gpus)"
            )
        run = _Run(new_run_id(spec), spec, resources)
        self._buffer.open(run.run_id)
        with self._lock:
            self._pending.append(run)
        self._dispatch()
        return run.run_id

    def cancel(self, run_id: str) -> None:
        if not self._buffer.mark_cancelling(run_id):
            return
        with self._lock:
            queued = next((r for r in self._pending if r.run_id == run_id), None)
            if queued is not None:
                self._pending.remove(queued)
            active = self._active.get(run_id)
            if active is not None:
                active.cancel.set()
        if queued is not None:
            self._buffer.emit(ExecutorEvent(run_id, "cancelled", {"reason": "cancelled"}))

    def drain(self) -> list[ExecutorEvent]:
        return self._buffer.drain()

    def running(self) -> set[str]:
        return self._buffer.running()

    def capacity(self) -> Capacity:
        node = {
            "node_id": "in-process",
            "address": socket.gethostname(),
            "cpus": float(self._slots),
            "gpus": self._gpus,
            "alive": True,
        }
        return Capacity(
            total_cpus=float(self._slots),
            total_gpus=self._gpus,
            max_node_cpus=float(self._slots),
            max_node_gpus=self._gpus,
            nodes=[node],
        )

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel everything, wait up to ``timeout`` s for runs to stop at an event boundary,
        then report the rest ``cancelled`` (their threads are daemons and end with the
        process)."""
        self._closed = True
        for run_id in self._buffer.running():
            self.cancel(run_id)
        with self._lock:
            threads = [r.thread for r in self._active.values() if r.thread is not None]
        for thread in threads:
            thread.join(timeout)
        for run_id in self._buffer.running():
            self._buffer.emit(ExecutorEvent(run_id, "cancelled", {"reason": "shutdown"}))

    # -- internals --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        to_start: list[_Run] = []
        with self._lock:
            for run in list(self._pending):
                if (
                    run.resources.cpus <= self._free_cpus + _EPS
                    and run.resources.gpus <= self._free_gpus + _EPS
                ):
                    self._pending.remove(run)
                    self._free_cpus -= run.resources.cpus
                    self._free_gpus -= run.resources.gpus
                    run.thread = threading.Thread(
                        target=self._execute, args=(run,), name=f"trial-{run.run_id}", daemon=True
                    )
                    self._active[run.run_id] = run
                    to_start.append(run)
        for run in to_start:
            assert run.thread is not None
            run.thread.start()

    def _execute(self, run: _Run) -> None:
        terminal: ExecutorEvent | None = None
        try:
            terminal = self._drive(run)
        except BaseException as exc:  # every way out of a trial becomes an event
            if run.cancel.is_set():
                terminal = ExecutorEvent(run.run_id, "cancelled", {"reason": "cancelled"})
            else:
                terminal = ExecutorEvent(run.run_id, "failed", format_failure(exc))
        finally:
            with self._lock:
                self._active.pop(run.run_id, None)
                self._free_cpus = min(self._free_cpus + run.resources.cpus, float(self._slots))
                self._free_gpus = min(self._free_gpus + run.resources.gpus, self._gpus)
            if terminal is not None:
                self._buffer.emit(terminal)
            self._dispatch()

    def _drive(self, run: _Run) -> ExecutorEvent:
        if run.cancel.is_set():
            return ExecutorEvent(run.run_id, "cancelled", {"reason": "cancelled"})
        messages = self._runner(run.spec)
        try:
            for message in messages:
                event = event_from_message(run.run_id, message)
                if event.kind == "result":
                    return event  # finished: a result wins over a late cancel
                if run.cancel.is_set():
                    return ExecutorEvent(run.run_id, "cancelled", {"reason": "cancelled"})
                self._buffer.emit(event)
        finally:
            close = getattr(messages, "close", None)
            if close is not None:
                close()
        if run.cancel.is_set():
            return ExecutorEvent(run.run_id, "cancelled", {"reason": "cancelled"})
        return ExecutorEvent(
            run.run_id,
            "failed",
            {"error": "RuntimeError: trial ended without a result", "traceback": ""},
        )


if TYPE_CHECKING:  # mypy checks that InProcessExecutor implements the protocol

    def _conforms(executor: InProcessExecutor) -> Executor:
        return executor
