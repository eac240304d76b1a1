"""One protocol, every executor: the same checks run on the in-process executor and on Ray.

The contract (workers/executor.py): per run, ``started``, ``report`` s in order, then exactly one
terminal event; trial-code errors are non-retryable failures, dead workers retryable ones;
cancel ends in ``cancelled``; ``running()`` holds exactly the unfinished runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.executor import Executor, ExecutorEvent, InProcessExecutor, Resources
from workers.ray_executor import RayExecutor
from workers.trial import SLEEP_CHECKPOINT_NAME, TrialSpec

TIMEOUT = 180.0  # generous: the machine running the tests may be busy


class Notifications:
    def __init__(self) -> None:
        self.calls = 0
        self.wake = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.wake.set()


class Harness:
    """An executor plus everything drained from it, per run."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.notes = Notifications()
        self.events: dict[str, list[ExecutorEvent]] = {}
        executor.start(self.notes)

    def submit(self, config: dict, *, cpus: float = 1.0, attempt: int = 1, **kw) -> str:
        spec = TrialSpec(
            study_id="conf",
            trial_number=len(self.events),
            attempt=attempt,
            lease_token="lease",
            config=config,
            runner=kw.pop("runner", "sleep"),
            **kw,
        )
        run_id = self.executor.submit(spec, Resources(cpus=cpus))
        self.events[run_id] = []
        return run_id

    def pump(self) -> None:
        for event in self.executor.drain():
            if event.run_id in self.events:  # a shared executor may hold other runs' events
                self.events[event.run_id].append(event)

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}: {self.events}")
            self.notes.wake.wait(min(left, 0.5))
            self.notes.wake.clear()

    def finished(self, *run_ids: str) -> bool:
        return all(self.events[r] and self.events[r][-1].terminal for r in run_ids)

    def wait_finished(self, *run_ids: str) -> None:
        self.wait_for(lambda: self.finished(*run_ids), f"{run_ids} to finish")

    def kinds(self, run_id: str) -> list[str]:
        return [e.kind for e in self.events[run_id]]


@pytest.fixture(params=["inprocess", pytest.param("ray", marks=pytest.mark.ray)])
def executor(request: pytest.FixtureRequest) -> Iterator[Executor]:
    if request.param == "inprocess":
        made: Executor = InProcessExecutor(slots=2)
    else:
        request.getfixturevalue("ray_executor")  # the session's Ray, up and warm
        made = RayExecutor()
    yield made
    made.shutdown()


@pytest.fixture
def harness(executor: Executor) -> Harness:
    return Harness(executor)


def test_each_run_streams_started_its_reports_in_order_then_one_result(harness):
    runs = [harness.submit({"epochs": 3, "sleep_s": 0.05, "t": t}) for t in (1.0, 5.0, 20.0)]
    assert set(runs) <= harness.executor.running()
    harness.wait_finished(*runs)
    for run_id in runs:
        assert harness.kinds(run_id) == ["started", "report", "report", "report", "result"]
        reports = [e.payload for e in harness.events[run_id] if e.kind == "report"]
        assert [r["epoch"] for r in reports] == [1, 2, 3]
        accuracies = [r["metrics"]["val_accuracy"] for r in reports]
        assert accuracies == sorted(accuracies)
        result = harness.events[run_id][-1]
        assert result.payload["epochs"] == 3 and result.payload["stopped"] is False
        assert result.payload["metrics"]["val_accuracy"] == accuracies[-1]
        assert harness.events[run_id][0].payload["env"]["pid"] > 0
    assert not set(runs) & harness.executor.running()
    assert harness.notes.calls >= 5
    time.sleep(0.2)
    harness.pump()  # nothing arrives after a terminal event
    assert all(len(harness.events[r]) == 5 for r in runs)


def test_reports_an_executor_may_hold_all_arrive_in_order(harness):
    # No pruner waits for them (prompt_reports=False): fast epochs' reports may travel
    # together, but every one arrives, in order, before the result.
    run_id = harness.submit({"epochs": 5}, prompt_reports=False)
    harness.wait_finished(run_id)
    assert harness.kinds(run_id) == ["started"] + ["report"] * 5 + ["result"]
    epochs = [e.payload["epoch"] for e in harness.events[run_id] if e.kind == "report"]
    assert epochs == [1, 2, 3, 4, 5]


def test_reports_arrive_while_the_trial_still_runs(harness):
    run_id = harness.submit({"epochs": 3, "sleep_s": 1.0})
    harness.wait_for(lambda: "report" in harness.kinds(run_id), "the first report")
    assert not harness.finished(run_id) and run_id in harness.executor.running()
    harness.wait_finished(run_id)
    assert harness.kinds(run_id)[-1] == "result"


def test_an_error_in_the_trial_code_is_one_non_retryable_failure(harness):
    run_id = harness.submit({"epochs": 3, "fail_at_epoch": 2})
    harness.wait_finished(run_id)
    assert harness.kinds(run_id) == ["started", "report", "failed"]
    failed = harness.events[run_id][-1]
    assert failed.retryable is False
    assert "RuntimeError: injected failure at epoch 2" in failed.payload["error"]
    assert "Traceback" in failed.payload["traceback"]
    assert "trial.py" in failed.payload["traceback"]
    assert run_id not in harness.executor.running()


def test_cancel_ends_a_long_trial_with_cancelled(harness):
    run_id = harness.submit({"epochs": 400, "sleep_s": 0.05})
    harness.wait_for(lambda: "report" in harness.kinds(run_id), "the first report")
    harness.executor.cancel(run_id)
    harness.wait_finished(run_id)
    assert harness.kinds(run_id)[-1] == "cancelled"
    assert harness.kinds(run_id).count("cancelled") == 1
    assert run_id not in harness.executor.running()
    harness.executor.cancel(run_id)  # cancelling a finished run changes nothing
    time.sleep(0.2)
    harness.pump()
    assert harness.kinds(run_id).count("cancelled") == 1


def test_a_cancelled_trials_code_stops_running(harness, tmp_path):
    # Its checkpoint, written after every epoch, stops advancing once the run is cancelled:
    # the trial's code is not left running beside the next trial of its worker.
    run_id = harness.submit({"epochs": 400, "sleep_s": 0.05}, checkpoint_dir=str(tmp_path / "ckpt"))
    checkpoint = tmp_path / "ckpt" / SLEEP_CHECKPOINT_NAME
    harness.wait_for(lambda: harness.kinds(run_id).count("report") >= 2, "two reports")
    harness.executor.cancel(run_id)
    harness.wait_finished(run_id)
    assert harness.kinds(run_id)[-1] == "cancelled"
    epoch = json.loads(checkpoint.read_text())["epoch"]
    time.sleep(0.5)  # ten epochs' time
    assert json.loads(checkpoint.read_text())["epoch"] == epoch


def test_a_queued_run_cancelled_before_it_starts_never_starts(harness):
    # Two long runs fill the two CPUs, so the third waits and is cancelled while it waits.
    blockers = [harness.submit({"epochs": 400, "sleep_s": 0.05}) for _ in range(2)]
    harness.wait_for(
        lambda: all("started" in harness.kinds(b) for b in blockers), "the blockers to start"
    )
    queued = harness.submit({"epochs": 1})
    harness.executor.cancel(queued)
    harness.wait_finished(queued)
    assert harness.kinds(queued) == ["cancelled"]
    for blocker in blockers:
        harness.executor.cancel(blocker)
    harness.wait_finished(*blockers)
    assert harness.executor.running().isdisjoint({queued, *blockers})


def test_cancelling_an_unknown_run_is_a_no_op(harness):
    harness.executor.cancel("no-such-run")
    harness.pump()
    assert "no-such-run" not in harness.executor.running()
    assert all(not events for events in harness.events.values())


def test_capacity_reports_at_least_one_cpu(harness):
    assert isinstance(harness.executor, Executor)
    capacity = harness.executor.capacity()
    assert capacity.total_cpus >= 1 and capacity.max_node_cpus >= 1
    assert capacity.fits(Resources(cpus=1))
    assert not capacity.fits(Resources(cpus=capacity.max_node_cpus + 1))
    assert capacity.nodes and all(
        {"node_id", "address", "cpus", "gpus", "alive"} <= set(n) for n in capacity.nodes
    )


# ----------------------------------------------------------------------------- Ray only


@pytest.mark.ray
def test_ray_a_killed_worker_is_a_retryable_failure(fresh_ray_executor):
    harness = Harness(fresh_ray_executor)
    run_id = harness.submit({"epochs": 3, "crash_at_epoch": 2, "crash_attempts": [1]})
    harness.wait_finished(run_id)
    # Epoch 1's report may die with the worker: the crash comes microseconds after it, so it
    # is held to ride with the next message (a fast epoch), and Ray sends an item only after
    # the generator has moved on anyway.
    assert harness.kinds(run_id) in (["started", "report", "failed"], ["started", "failed"])
    failed = harness.events[run_id][-1]
    assert failed.retryable is True
    assert "WorkerCrashedError" in failed.payload["error"]
    # The next attempt is not in crash_attempts: it runs to the end.
    again = harness.submit({"epochs": 3, "crash_at_epoch": 2, "crash_attempts": [1]}, attempt=2)
    harness.wait_finished(again)
    assert harness.kinds(again)[-1] == "result"


@pytest.mark.ray
def test_ray_train_runner_streams_reports_on_a_warm_worker(ray_executor, fresh_ray_executor):
    warm_pids = set(ray_executor.wait_until_warm(timeout=TIMEOUT))
    harness = Harness(fresh_ray_executor)
    config = {
        "dataset": "digits",
        "model": "mlp",
        "method": "tsam",
        "epochs": 2,
        "samples": 2,
        "sharpness_draws": 1,
        "sharpness_examples": 64,
        "num_threads": 1,
    }
    tick = time.monotonic()
    run_id = harness.submit(config, runner="train")
    harness.wait_finished(run_id)
    assert harness.kinds(run_id) == ["started", "report", "report", "result"], harness.events
    started = harness.events[run_id][0].payload["env"]
    assert started["node_id"] and started["node_ip"] == "127.0.0.1"
    assert started["pid"] in warm_pids  # Ray reused a warmed worker process
    result = harness.events[run_id][-1].payload
    assert 0.0 <= result["metrics"]["test_accuracy"] <= 1.0 and result["epochs"] == 2
    print(f"train trial on a warm Ray worker: {time.monotonic() - tick:.1f} s")


@pytest.mark.ray
def test_ray_workers_beyond_num_cpus_stay_warm_through_a_pause(ray_executor, fresh_ray_executor):
    # Four half-CPU trials on the session's 2-CPU Ray run in four worker processes. Ray's own
    # default ends idle workers beyond num_cpus after a second; the embedded Ray keeps them
    # (idle_worker_s), so trials after a pause run in processes that existed before it.
    harness = Harness(fresh_ray_executor)

    def pids_of_four() -> set[int]:
        runs = [harness.submit({"epochs": 1, "sleep_s": 1.5}, cpus=0.5) for _ in range(4)]
        harness.wait_finished(*runs)
        assert all(harness.kinds(r)[-1] == "result" for r in runs), harness.events
        return {harness.events[r][0].payload["env"]["pid"] for r in runs}

    # Four workers must exist first; under load a slow worker start lets a finished one take
    # the fourth trial, so try a few rounds.
    for _ in range(3):
        if len(pids_of_four()) == 4:
            break
    else:
        pytest.fail("four concurrent half-CPU trials never ran in four worker processes")
    paused_at = time.clock_gettime(time.CLOCK_BOOTTIME)
    time.sleep(3.0)  # three times Ray's default idle threshold
    after = pids_of_four()
    assert len(after) == 4
    assert all(_started_at(pid) < paused_at for pid in after), "a worker was started anew"


def _started_at(pid: int) -> float:
    """When process ``pid`` started, in seconds since boot (``CLOCK_BOOTTIME``), from /proc."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def test_ray_executor_rejects_a_bad_idle_worker_time():
    for bad in (0, -1.0, True, "60", 100_000):
        with pytest.raises(ValueError, match="idle_worker_s"):
            RayExecutor(idle_worker_s=bad)


@pytest.mark.ray
def test_ray_a_joined_executor_leaves_the_shared_ray_running(ray_executor):
    import ray

    joined = RayExecutor()
    joined.start(lambda: None)
    joined.shutdown()
    assert ray.is_initialized()
    assert ray_executor.capacity().total_cpus == 2


@pytest.mark.ray
def test_ray_listens_on_loopback_only(ray_executor):
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    nodes = ray_executor.capacity().nodes
    assert [n["address"] for n in nodes] == ["127.0.0.1"]
    ray_pids = _descendants(os.getpid()) | {os.getpid()}
    listing = subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True, check=True).stdout
    ray_sockets = []
    for line in listing.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & ray_pids:
            local = line.split()[4]  # netid state recv-q send-q LOCAL PEER process
            ray_sockets.append((local, line))
    assert ray_sockets, f"found no Ray listeners in:\n{listing}"
    exposed = [line for local, line in ray_sockets if not _is_loopback(local)]
    assert not exposed, "Ray listens beyond loopback:\n" + "\n".join(exposed)


def _descendants(root: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, set()).add(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _is_loopback(local: str) -> bool:
    host = local.rsplit(":", 1)[0].strip("[]")
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    return host.startswith("127.") or host == "::1"
