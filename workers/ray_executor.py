"""The Ray executor: each trial is one Ray task whose events stream back as they happen.

* A trial is a ``@ray.remote(max_retries=0)`` streaming-generator task running
  :func:`workers.trial.run_trial` with ``num_cpus``/``num_gpus`` from its
  :class:`~workers.executor.Resources` (fractions allowed). Ray's own retries are off: a Ray
  retry would replay the report stream from epoch 0 behind the scheduler's back; the scheduler
  retries a failed run itself, as the trial's next attempt, which resumes from its checkpoint.
* The last epoch's report rides in one stream item with the result, and where no pruner
  acts on reports (``TrialSpec.prompt_reports`` false) a fast epoch's report (under
  :data:`FAST_EPOCH_S`) waits, up to :data:`HOLD_MAX_S`, for a later message
  (:func:`_stream_items`); every other message is an item of its own, sent as soon as the
  trial yields it. Each item costs Ray about a millisecond of CPU on each end, which a sweep
  of short trials on a small machine feels.
* One "pump" thread runs an asyncio loop with one small reader coroutine per run: ``async for
  ref in generator`` wakes as soon as Ray has a new item, with no polling, so an event reaches
  the scheduler within a millisecond or so of Ray receiving it, and a new submission is read
  from its first item on. One thread rather than one per trial: a cluster can run hundreds of
  trials, and a thread blocked per trial buys nothing, since the events are tiny dicts.
  (Polling ``ray.wait`` over all generators with a timeout instead puts up to that timeout
  between a submission and its first read: at 50 ms, most of a zero-work trial's overhead.)
* Errors map as follows. An exception raised by the trial code is caught inside the task,
  sent as an item with its full original traceback, and re-raised (so Ray records the task
  as failed): ``failed``, ``retryable=False``; any other ``RayTaskError`` (e.g. the spec
  could not be read) maps the same way. ``TaskCancelledError``: ``cancelled``. Everything
  else Ray raises -- ``WorkerCrashedError`` (the worker process died: killed, OOM, segfault,
  ``os._exit``), ``NodeDiedError``, ``LocalRayletDiedError``, ``ObjectLostError`` and its
  subclasses (``OwnerDiedError``, ...), ``RayActorError``/``ActorDiedError``,
  ``RaySystemError``, ``OutOfMemoryError``, ``ObjectStoreFullError`` -- is infrastructure:
  ``failed``, ``retryable=True``. Once a cancel was requested, any error ends as
  ``cancelled``. Ray sends a stream item while the trial runs on, so a worker that dies
  within microseconds of a report may take that report with it (the next attempt resumes
  after the epoch's checkpoint, and the trial lacks that epoch's metrics).
* Cancel is ``ray.cancel`` on the generator: it raises ``KeyboardInterrupt`` inside the trial
  (the worker process is reused afterwards). A trial that does not stop within
  :attr:`RayExecutor.cancel_grace_s` is force-cancelled (its worker is killed).
* An embedded Ray keeps idle worker processes for ``idle_worker_s`` (Ray's own default is one
  second for the workers beyond ``num_cpus``): trials with fractional CPUs run more workers
  than CPUs, and without it every pause of a second between trials -- the next study, a
  resumed one -- would make those trials pay a new process and its torch import (10-30 s
  here) again. A joined cluster keeps its own setting.
* ``warm_workers > 0`` runs that many tiny tasks at start-up that pay a trial's one-off costs
  (importing torch, scikit-learn and the training loop, and torch's lazy ``torch._dynamo``
  import on the first optimizer); Ray keeps and reuses those worker processes. Measured on a
  busy 2-core machine: a 2-epoch digits trial took 43-46 s on a cold worker (first report
  after 43 s) and 1.7 s on a warm one (first report after 0.8-1 s).

Loopback: an embedded Ray (``address=None``) binds to 127.0.0.1. Ray rewrites
``_node_ip_address="127.0.0.1"`` to the machine's outward address (and then listens on all
interfaces) unless Ray clusters are "disabled" with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``;
with it, every Ray listener (GCS, raylet, workers, agents) binds 127.0.0.1 only. That is a
single-node setting, so the executor sets it only for the embedded Ray it starts itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.executor import (
    Capacity,
    EventBuffer,
    Executor,
    ExecutorEvent,
    Resources,
    event_from_message,
    format_failure,
    new_run_id,
)
from workers.trial import TrialSpec, run_trial

__all__ = ["RayExecutor"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_ERROR_KIND = "_error"  # an exception the trial code raised, caught inside the task
_BATCH_KIND = "_batch"  # several runner messages in one stream item, in order
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTUP_TIMEOUT_TEXT = "timed out during startup"


# --------------------------------------------------------------------- code that runs in workers


def _trial_task(spec_dict: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The Ray task: run one trial and stream its events (a generator -> streaming task)."""
    spec = TrialSpec.from_dict(spec_dict)
    try:
        yield from _stream_items(
            run_trial(spec), spec.config.get("epochs"), hold_fast=not spec.prompt_reports
        )
    except Exception as exc:
        # Ray's RayTaskError keeps only a trimmed, coloured traceback; send the original first.
        # KeyboardInterrupt (ray.cancel) is not an Exception and passes through untouched.
        yield {"kind": _ERROR_KIND, **format_failure(exc)}
        raise


#: A report that comes less than this long after the trial's previous message -- a fast
#: epoch -- may wait to travel with a later message (when nothing acts on it at once).
FAST_EPOCH_S = 0.05
#: ... but no longer than this: the dashboard's curves stay live, and a worker that dies takes
#: at most this much of its reports with it.
HOLD_MAX_S = 1.0


def _stream_items(
    messages: Iterator[dict[str, Any]],
    last_epoch: Any,
    *,
    hold_fast: bool,
    fast_epoch_s: float = FAST_EPOCH_S,
    hold_max_s: float = HOLD_MAX_S,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[dict[str, Any]]:
    """``messages`` grouped into Ray stream items. Every item costs Ray a round of bookkeeping
    on both ends -- about a millisecond of CPU per item on each side here, on a machine that a
    sweep of short trials keeps busy (``bench/ray_floor.py --items``) -- so messages that
    nothing needs at once share items:

    * the report of the last epoch (``last_epoch``, the runner's ``epochs``) always rides with
      the result, which follows it after only the final checkpoint and test evaluation;
    * with ``hold_fast`` (no pruner acts on the reports), the report of an epoch that took
      less than ``fast_epoch_s`` since the previous message waits for a later message, for at
      most ``hold_max_s``: a sweep of fast epochs sends a handful of items per trial instead
      of one per epoch. Held reports reach the dashboard up to ``hold_max_s`` late, and a
      worker killed meanwhile takes them with it (as Ray may lose an item it has not sent);
    * every other message (``started``, a slow epoch's report, the result) goes at once,
      carrying the reports held before it. If the trial raises, the held reports go first.
    """
    held: list[dict[str, Any]] = []
    held_since = previous = clock()
    try:
        for message in messages:
            now = clock()
            fast, previous = now - previous < fast_epoch_s, now
            if not held:
                held_since = now
            held.append(message)
            if message.get("kind") == "report":
                if isinstance(last_epoch, int) and message.get("epoch") == last_epoch:
                    continue
                if hold_fast and fast and now - held_since < hold_max_s:
                    continue
            item, held = _item(held), []
            yield item
    except Exception:  # the trial raised: what it reported goes first
        if held:
            item, held = _item(held), []
            yield item
        raise
    if held:  # the messages ended after a held report (a runner without a result)
        yield _item(held)


def _item(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return messages[0] if len(messages) == 1 else {"kind": _BATCH_KIND, "items": messages}


def _warm_task() -> int:
    """Pay a trial's one-off start-up costs once, in a worker process Ray will reuse: import
    torch, the training loop and scikit-learn's dataset loaders, and build one optimizer
    (torch's ``Optimizer.__init__`` imports ``torch._dynamo`` on first use). Measured here,
    these cost a cold worker 10-30 s before its first epoch."""
    import sklearn.datasets  # noqa: F401
    import torch

    import tsam_core.train  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return os.getpid()


# ------------------------------------------------------------------------------------- driver


@dataclass
class _RayRun:
    run_id: str
    generator: Any  # ray.ObjectRefGenerator, read only by its reader on the pump loop
    reader: asyncio.Task[None] | None = None
    cancel_requested_at: float | None = None
    force_cancelled: bool = False


class RayExecutor:
    """:class:`~workers.executor.Executor` on Ray.

    ``address=None`` starts an embedded single-node Ray on loopback at :meth:`start`
    (``num_cpus``/``num_gpus`` size it; ``temp_dir`` holds its session files and sockets,
    and must be short enough for Unix socket paths); an address (``"auto"``,
    ``"host:6379"``, ``"ray://..."``) joins that cluster. If Ray is already initialised in
    this process, the executor uses it as it is, and :meth:`shutdown` leaves it running:
    only the executor that started Ray stops it.
    """

    #: How often the pump thread checks cancel deadlines (events need no polling).
    poll_interval_s: float = 0.05
    #: After a cancel, how long a trial may take to stop before its worker is killed; after
    #: twice this long the run is reported cancelled whatever Ray says.
    cancel_grace_s: float = 15.0
    #: Embedded-Ray start-up attempts: on a loaded machine Ray's agents can miss Ray's fixed
    #: 30-s start-up deadline, and a second try usually succeeds.
    init_attempts: int = 3

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        warm_workers: int = 0,
        temp_dir: str | None = None,
        idle_worker_s: float = 60.0,
    ) -> None:
        if address is not None and (not isinstance(address, str) or not address):
            raise ValueError(f"address must be a non-empty string or None, got {address!r}")
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {value!r}")
        if address is not None and (num_cpus is not None or num_gpus is not None):
            raise ValueError("num_cpus/num_gpus size an embedded Ray; a joined cluster has its own")
        if not isinstance(warm_workers, int) or isinstance(warm_workers, bool) or warm_workers < 0:
            raise ValueError(f"warm_workers must be an integer >= 0, got {warm_workers!r}")
        if isinstance(idle_worker_s, bool) or not isinstance(idle_worker_s, int | float):
            raise ValueError(f"idle_worker_s must be a number of seconds, got {idle_worker_s!r}")
        if not 0 < idle_worker_s <= 86_400:
            raise ValueError(f"idle_worker_s must be in (0, 86400], got {idle_worker_s!r}")
        if temp_dir is not None and not os.path.isabs(temp_dir):
            raise ValueError(f"temp_dir must be an absolute path, got {temp_dir!r}")
        self._address = address
        self._num_cpus = num_cpus
        self._num_gpus = num_gpus
        self._warm_workers = warm_workers
        self._temp_dir = temp_dir
        self._idle_worker_s = float(idle_worker_s)

        self._buffer = EventBuffer()
        self._lock = threading.Lock()
        self._runs: dict[str, _RayRun] = {}
        self._stop = threading.Event()
        self._pump_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._task: Any = None
        self._warm_refs: list[Any] = []
        self._owns_ray = False
        self._started = False
        self._closed = False
        #: Seconds ``ray.init`` took in :meth:`start` (None if Ray was already running).
        self.init_seconds: float | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, notify: Callable[[], None]) -> None:
        """Connect to (or start) Ray and the pump thread. Calling it again only replaces
        ``notify`` (so one executor can serve several consumers in turn)."""
        if self._closed:
            raise RuntimeError("executor is shut down")
        self._buffer.set_notify(notify)
        with self._lock:
            if self._started:
                return
            self._started = True
        ray = _ray()

        if not ray.is_initialized():
            try:
                self._init_ray()
            except BaseException:
                self._started = False  # let a later start() try again
                raise
        self._task = ray.remote(max_retries=0, num_returns="streaming")(_trial_task)
        self._pump_thread = threading.Thread(target=self._pump, name="ray-executor", daemon=True)
        self._pump_thread.start()
        if not self._loop_ready.wait(30):
            raise RuntimeError("the Ray executor's pump thread did not start")
        if self._warm_workers:
            self._start_warmup()

    def _init_ray(self) -> None:
        ray = _ray()

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "ignore_reinit_error": True,
        }
        if self._address is None:
            _keep_ray_on_loopback()
            # "local" always starts a new Ray, never joins a cluster found on this machine.
            kwargs.update(address="local", _node_ip_address=LOOPBACK)
            if self._num_cpus is not None:
                kwargs["num_cpus"] = self._num_cpus
            if self._num_gpus is not None:
                kwargs["num_gpus"] = self._num_gpus
            if self._temp_dir is not None:
                kwargs["_temp_dir"] = self._temp_dir
            threshold_ms = round(self._idle_worker_s * 1000)
            kwargs["_system_config"] = {"idle_worker_killing_time_threshold_ms": threshold_ms}
        else:
            kwargs["address"] = self._address
        tick = time.perf_counter()
        for attempt in range(1, self.init_attempts + 1):
            try:
                ray.init(**kwargs)
                break
            except Exception as exc:
                if _STARTUP_TIMEOUT_TEXT not in str(exc) or attempt == self.init_attempts:
                    raise
                logger.warning("Ray start-up timed out (attempt %d); retrying", attempt)
                ray.shutdown()
        self._owns_ray = True  # started it (or connected this process): shutdown() undoes it
        self.init_seconds = time.perf_counter() - tick
        logger.info("Ray started in %.1f s", self.init_seconds)

    def _start_warmup(self) -> None:
        ray = _ray()

        total = float(ray.cluster_resources().get("CPU", 1.0)) or 1.0
        # All warm-up tasks must run at once, each in its own worker process; together they
        # hold at most the whole cluster, so trials submitted meanwhile wait for warm workers.
        share = min(1.0, total / self._warm_workers)
        warm = ray.remote(max_retries=0)(_warm_task).options(num_cpus=share)
        self._warm_refs = [warm.remote() for _ in range(self._warm_workers)]

    def wait_until_warm(self, timeout: float | None = None) -> list[int]:
        """Block until the warm-up tasks are done; returns the warmed worker pids (empty with
        ``warm_workers=0``). Raises ``TimeoutError`` after ``timeout`` seconds."""
        if not self._warm_refs:
            return []
        ray = _ray()

        try:
            pids = ray.get(self._warm_refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise TimeoutError(f"Ray workers not warm after {timeout} s") from exc
        return [int(pid) for pid in pids]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel this executor's runs, wait up to ``timeout`` s for their terminal events (the
        rest are reported ``cancelled``), stop the pump thread, and stop Ray if this executor
        started it."""
        if self._closed:
            return
        self._closed = True
        for run_id in self._buffer.running():
            self.cancel(run_id)
        deadline = time.monotonic() + timeout
        while self._buffer.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        for run_id in self._buffer.running():
            self._buffer.emit(ExecutorEvent(run_id, "cancelled", {"reason": "shutdown"}))
        self._stop.set()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=max(1.0, 10 * self.poll_interval_s))
        with self._lock:
            self._runs.clear()
        if self._owns_ray:
            ray = _ray()

            ray.shutdown()
            self._owns_ray = False

    # -- protocol ---------------------------------------------------------------------------

    def submit(self, spec: TrialSpec, resources: Resources) -> str:
        if not self._started or self._closed:
            raise RuntimeError("executor is not running: call start() first")
        run_id = new_run_id(spec)
        generator = self._task.options(
            num_cpus=resources.cpus, num_gpus=resources.gpus, name=f"trial:{run_id}"
        ).remote(spec.to_dict())
        # Registered only once Ray accepted the task; the pump cannot see it before this.
        run = _RayRun(run_id, generator)
        self._buffer.open(run_id)
        with self._lock:
            self._runs[run_id] = run
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._spawn_reader, run)
        return run_id

    def cancel(self, run_id: str) -> None:
        if not self._buffer.mark_cancelling(run_id):
            return
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.cancel_requested_at is not None:
                return
            run.cancel_requested_at = time.monotonic()
        self._ray_cancel(run, force=False)

    def drain(self) -> list[ExecutorEvent]:
        return self._buffer.drain()

    def running(self) -> set[str]:
        return self._buffer.running()

    def capacity(self) -> Capacity:
        if not self._started:
            raise RuntimeError("executor is not running: call start() first")
        ray = _ray()

        nodes = []
        for node in ray.nodes():
            resources = node.get("Resources", {})
            nodes.append(
                {
                    "node_id": node.get("NodeID"),
                    "address": node.get("NodeManagerAddress"),
                    "cpus": float(resources.get("CPU", 0.0)),
                    "gpus": float(resources.get("GPU", 0.0)),
                    "alive": bool(node.get("Alive", False)),
                }
            )
        alive = [n for n in nodes if n["alive"]]
        return Capacity(
            total_cpus=sum(n["cpus"] for n in alive),
            total_gpus=sum(n["gpus"] for n in alive),
            max_node_cpus=max((n["cpus"] for n in alive), default=0.0),
            max_node_gpus=max((n["gpus"] for n in alive), default=0.0),
            nodes=nodes,
        )

    # -- the pump thread --------------------------------------------------------------------

    def _pump(self) -> None:
        """The pump thread: an asyncio loop with one reader coroutine per run."""
        asyncio.run(self._pump_main())

    async def _pump_main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_ready.set()
        while not self._stop.is_set():
            try:
                self._enforce_cancel_deadlines()
            except Exception:
                logger.exception("Ray executor: enforcing cancel deadlines failed")
            await asyncio.sleep(self.poll_interval_s)
        with self._lock:
            readers = [r.reader for r in self._runs.values() if r.reader is not None]
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    def _spawn_reader(self, run: _RayRun) -> None:
        """On the pump loop: start reading ``run``'s stream (it may have ended already)."""
        if run.run_id in self._runs:
            run.reader = asyncio.get_running_loop().create_task(self._read(run))

    async def _read(self, run: _RayRun) -> None:
        """Emit ``run``'s items as they arrive; end the run on its terminal item. Awaiting the
        stream wakes on each new item (no polling), so a trial's events reach the scheduler
        as soon as Ray has them."""
        try:
            async for ref in run.generator:
                terminal = await self._handle_item(run, ref)
                if terminal is not None:
                    self._finish(run, terminal)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._finish(run, self._error_event(run, exc))
            return
        # The stream ended without a result (cannot happen with run_trial).
        self._finish(run, self._ended_without_result(run))

    async def _handle_item(self, run: _RayRun, ref: Any) -> ExecutorEvent | None:
        """Emit a non-terminal item's events and return None, or return the terminal event."""
        try:
            message = await asyncio.wait_for(ref, timeout=60)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._error_event(run, exc)
        if isinstance(message, dict) and message.get("kind") == _BATCH_KIND:
            for item in message.get("items", []):
                terminal = self._handle_message(run, item)
                if terminal is not None:
                    return terminal
            return None
        return self._handle_message(run, message)

    def _handle_message(self, run: _RayRun, message: Any) -> ExecutorEvent | None:
        """Emit one runner message's event and return None, or return the terminal event."""
        if isinstance(message, dict) and message.get("kind") == _ERROR_KIND:
            if self._buffer.is_cancelling(run.run_id):
                return _cancelled(run.run_id)
            payload = {
                "error": str(message.get("error", "")),
                "traceback": str(message.get("traceback", "")),
            }
            return ExecutorEvent(run.run_id, "failed", payload, retryable=False)
        try:
            event = event_from_message(run.run_id, message)
        except ValueError as exc:
            return ExecutorEvent(run.run_id, "failed", format_failure(exc), retryable=False)
        if event.terminal:
            return event
        self._buffer.emit(event)  # dropped by the buffer if a cancel is pending
        return None

    def _error_event(self, run: _RayRun, exc: Exception) -> ExecutorEvent:
        from ray import exceptions as rex

        if self._buffer.is_cancelling(run.run_id) or isinstance(exc, rex.TaskCancelledError):
            return _cancelled(run.run_id)
        if isinstance(exc, rex.RayTaskError):
            cause = getattr(exc, "cause", None) or exc
            payload = {
                "error": f"{type(cause).__name__}: {cause}",
                "traceback": _ANSI.sub("", str(exc)),
            }
            return ExecutorEvent(run.run_id, "failed", payload, retryable=False)
        # Worker crashed, node died, object/owner lost, system error, OOM, timeouts, ...:
        # not the trial's fault, so another attempt may well succeed.
        payload = {"error": f"{type(exc).__name__}: {_ANSI.sub('', str(exc))}", "traceback": ""}
        return ExecutorEvent(run.run_id, "failed", payload, retryable=True)

    def _ended_without_result(self, run: _RayRun) -> ExecutorEvent:
        if self._buffer.is_cancelling(run.run_id):
            return _cancelled(run.run_id)
        payload = {"error": "RuntimeError: trial ended without a result", "traceback": ""}
        return ExecutorEvent(run.run_id, "failed", payload, retryable=False)

    def _finish(self, run: _RayRun, terminal: ExecutorEvent) -> None:
        with self._lock:
            self._runs.pop(run.run_id, None)
        self._buffer.emit(terminal)

    def _enforce_cancel_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [
                r
                for r in self._runs.values()
                if r.cancel_requested_at is not None
                and now - r.cancel_requested_at > self.cancel_grace_s
            ]
        for run in late:
            assert run.cancel_requested_at is not None
            if not run.force_cancelled:
                run.force_cancelled = True
                logger.warning("run %s ignored cancel; killing its worker", run.run_id)
                self._ray_cancel(run, force=True)
            elif now - run.cancel_requested_at > 2 * self.cancel_grace_s:
                if run.reader is not None:
                    run.reader.cancel()
                self._finish(run, _cancelled(run.run_id, reason="cancel timed out"))

    def _ray_cancel(self, run: _RayRun, *, force: bool) -> None:
        ray = _ray()

        try:
            # ray.cancel reads only the generator's task ref, so calling it off the pump
            # thread is safe.
            ray.cancel(run.generator, force=force)
        except Exception:
            logger.exception("ray.cancel failed for run %s", run.run_id)


def _ray() -> Any:
    """Ray, imported on first use (importing this module must not start or import Ray) and
    typed ``Any``: Ray's annotations are partial."""
    import ray

    return ray


def _cancelled(run_id: str, reason: str = "cancelled") -> ExecutorEvent:
    return ExecutorEvent(run_id, "cancelled", {"reason": reason})


def _keep_ray_on_loopback() -> None:
    """Make an embedded Ray keep 127.0.0.1 as its node address, so its listeners bind to
    loopback only. Child processes read the environment variable; this process may have
    imported Ray (and read the setting) already, so its constant is updated too."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - layout of a future Ray
        return
    if getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray_constants.ENABLE_RAY_CLUSTER = False


if TYPE_CHECKING:  # mypy checks that RayExecutor implements the protocol

    def _conforms(executor: RayExecutor) -> Executor:
        return executor
