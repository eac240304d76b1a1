"""One trial, run anywhere: :class:`TrialSpec` says what to run, :func:`run_trial` runs it.

``run_trial`` is a plain generator of JSON-safe dicts, so the same code runs in a thread
(:class:`workers.executor.InProcessExecutor`), as a Ray streaming-generator task
(:class:`workers.ray_executor.RayExecutor`) or by hand. It yields, in order:

1. ``{"kind": "started", "env": {...}}`` -- where and with what it runs (host, pid, Ray node,
   device, library versions, git revision, threads);
2. ``{"kind": "report", "epoch": int, "metrics": {...}}`` after each epoch, once the epoch's
   checkpoint is on disk (a report never refers to work a restart would lose);
3. ``{"kind": "result", "metrics": {...}, "stopped": bool, "epochs": int}`` at the end.

Exceptions raised by the trial propagate; executors turn them into ``failed`` events. Metric
values that are not finite (NaN, inf) become ``None``: they would not survive strict JSON (or a
PostgreSQL ``jsonb`` column).

Two runners:

* ``"train"`` -- ``spec.config`` holds flat :class:`tsam_core.config.TrainConfig` settings and
  the run is :func:`tsam_core.train.iter_train`, checkpointing into ``spec.checkpoint_dir``
  (so a later attempt resumes where the last checkpoint left off).
* ``"sleep"`` -- a zero-work trial for scheduler tests and overhead benchmarks: a known,
  smooth objective (:func:`sleep_objective`), injected failures and crashes, and resumable
  checkpoints; see ``_run_sleep`` for its settings.

This module never imports Ray (it only reads Ray's runtime context when Ray is already
running in this process) and imports torch only for the ``train`` runner.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "RUNNERS",
    "SLEEP_CHECKPOINT_NAME",
    "SLEEP_OPTIMA",
    "SLEEP_SETTINGS",
    "TrialSpec",
    "describe_environment",
    "run_trial",
    "sleep_objective",
]

RUNNERS = ("train", "sleep")

# Settings the sleep runner reads itself; every other numeric key of its config is a
# "hyperparameter" that feeds the fake objective (see sleep_objective).
SLEEP_SETTINGS = frozenset(
    {"epochs", "sleep_s", "fail_at_epoch", "crash_at_epoch", "crash_attempts"}
)

# The sleep runner's fake landscape: per hyperparameter, (optimum, width in decades). The score
# is a Gaussian bump in log10 space around the optimum, so samplers have a smooth, known target.
SLEEP_OPTIMA: dict[str, tuple[float, float]] = {
    "t": (5.0, 1.0),
    "rho": (0.05, 0.5),
    "lr": (0.05, 0.75),
    "samples": (4.0, 0.5),
    "weight_decay": (5e-4, 1.0),
}
SLEEP_CHECKPOINT_NAME = "sleep_checkpoint.json"
_LOG_CLAMP = (1e-6, 1e6)


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one attempt of one trial.

    ``config`` holds flat :class:`~tsam_core.config.TrainConfig` settings for the ``train``
    runner (the study's task and optimizer settings merged with the trial's parameters), or
    the sleep runner's settings. ``attempt`` counts the runs of the same trial (a retry after
    a crash is the next attempt); ``lease_token`` ties the run to the scheduler's lease.
    ``prompt_reports`` says whether each report is acted on as it arrives (the study has a
    pruner); when False, an executor may hold a fast epoch's report back to send it with a
    later message (the Ray executor does: each message it sends costs CPU on both ends).
    """

    study_id: str
    trial_number: int
    attempt: int
    lease_token: str
    config: dict[str, Any]
    checkpoint_dir: str | None = None
    runner: str = "train"
    git_revision: str | None = None
    prompt_reports: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.study_id, str) or not self.study_id:
            raise ValueError(f"study_id must be a non-empty string, got {self.study_id!r}")
        for name in ("trial_number", "attempt"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.lease_token, str):
            raise ValueError(f"lease_token must be a string, got {self.lease_token!r}")
        if not isinstance(self.config, Mapping):
            raise ValueError(f"config must be a mapping, got {type(self.config).__name__}")
        if any(not isinstance(key, str) for key in self.config):
            raise ValueError("config keys must be strings")
        # A private copy: the spec is frozen, its config should not change behind its back.
        object.__setattr__(self, "config", dict(self.config))
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        for name in ("checkpoint_dir", "git_revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")
        if not isinstance(self.prompt_reports, bool):
            raise ValueError(f"prompt_reports must be a bool, got {self.prompt_reports!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-safe when ``config`` is) that :meth:`from_dict` reads back."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"config": dict(self.config)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrialSpec field(s) {unknown}; known: {sorted(known)}")
        required = ("study_id", "trial_number", "attempt", "lease_token", "config")
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"missing TrialSpec field(s) {missing}")
        return cls(**dict(data))


def run_trial(spec: TrialSpec) -> Iterator[dict[str, Any]]:
    """Run ``spec`` and yield its events (``started``, ``report`` per epoch, ``result``).

    Closing the generator stops the trial at the current event; the last checkpoint stays.
    """
    if spec.runner == "train":
        yield from _run_train(spec)
    else:
        yield from _run_sleep(spec)


# --------------------------------------------------------------------------------- environment


def describe_environment(
    spec: TrialSpec, *, device: str = "cpu", num_threads: int | None = None
) -> dict[str, Any]:
    """Where this trial runs: host, process, Ray node (only when Ray is already running in
    this process; Ray is never imported here), device, versions, threads."""
    torch_module = sys.modules.get("torch")
    if num_threads is None and torch_module is not None:
        num_threads = int(torch_module.get_num_threads())
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "torch": (str(torch_module.__version__) if torch_module is not None else _version("torch")),
        "tsam_core": _version("tsam-sweep"),
        "git_revision": spec.git_revision,
        "device": device,
        "num_threads": num_threads,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "runner": spec.runner,
        "attempt": spec.attempt,
        "node_id": None,
        "node_ip": None,
    }
    ray_module = sys.modules.get("ray")
    if ray_module is not None:
        # Best effort: a half-initialised Ray must not fail the trial.
        with contextlib.suppress(Exception):
            if ray_module.is_initialized():
                context = ray_module.get_runtime_context()
                env["node_id"] = context.get_node_id()
                env["node_ip"] = ray_module.util.get_node_ip_address()
                env["gpu_ids"] = [str(g) for g in ray_module.get_gpu_ids()]
    return env


@functools.cache
def _version(distribution: str) -> str | None:
    """An installed distribution's version, read once per process: reading package metadata
    parses files and cost more than the rest of a zero-work trial together."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _json_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON-safe values: non-finite floats become None, numbers become floats."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            out[str(key)] = value
        elif isinstance(value, int | float):
            number = float(value)
            out[str(key)] = number if math.isfinite(number) else None
        else:
            out[str(key)] = str(value)
    return out


# ---------------------------------------------------------------------------------- train runner


def _run_train(spec: TrialSpec) -> Iterator[dict[str, Any]]:
    # Validate before announcing the start: a bad config fails the trial at once.
    from tsam_core.config import TrainConfig

    config = TrainConfig.from_dict({**spec.config, "checkpoint_dir": spec.checkpoint_dir})
    from tsam_core.train import iter_train  # imports torch (seconds in a cold process)

    yield {
        "kind": "started",
        "env": describe_environment(spec, device=config.device, num_threads=config.num_threads),
    }
    run = iter_train(config)
    try:
        while True:
            try:
                epoch, metrics = next(run)
            except StopIteration as done:
                result = done.value
                break
            yield {"kind": "report", "epoch": int(epoch), "metrics": _json_metrics(metrics)}
    finally:
        run.close()
    yield {
        "kind": "result",
        "metrics": _json_metrics(result.metrics),
        "stopped": bool(result.stopped),
        "epochs": int(result.epochs_completed),
    }


# ---------------------------------------------------------------------------------- sleep runner


def sleep_objective(config: Mapping[str, Any]) -> float:
    """The sleep runner's deterministic "quality" of a config, in (0, 1].

    For each hyperparameter named in :data:`SLEEP_OPTIMA` (``t``, ``rho``, ``lr``,
    ``samples``, ``weight_decay``) present in ``config`` with a numeric value (``t`` may also
    be ``"inf"``), ``d = (log10(value) - log10(optimum)) / width`` with the value clamped to
    [1e-6, 1e6]; the quality is ``exp(-sum(d**2) / 2)``. Other keys are ignored. The best
    config (t=5, rho=0.05, lr=0.05, samples=4, weight_decay=5e-4) scores 1.
    """
    total = 0.0
    for name, (optimum, width) in SLEEP_OPTIMA.items():
        if name not in config:
            continue
        value = _as_number(config[name])
        if value is None:
            continue
        clamped = min(max(value, _LOG_CLAMP[0]), _LOG_CLAMP[1])
        total += ((math.log10(clamped) - math.log10(optimum)) / width) ** 2
    return math.exp(-0.5 * total)


def sleep_val_accuracy(quality: float, epoch: int, epochs: int) -> float:
    """Fake validation accuracy after ``epoch`` of ``epochs``: starts near 0.1 (chance on ten
    classes), rises with the epoch, ends at ``0.1 + 0.85 * quality``."""
    return 0.1 + 0.85 * quality * math.sqrt(epoch / epochs)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    return None


def _int_setting(config: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = config.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"sleep runner: {name} must be an integer >= 1, got {value!r}")
    return value


def _run_sleep(spec: TrialSpec) -> Iterator[dict[str, Any]]:
    """The zero-work runner. Settings (all optional):

    * ``epochs`` (1) and ``sleep_s`` (0, seconds per epoch);
    * ``fail_at_epoch``: raise ``RuntimeError("injected failure at epoch N")`` at the start of
      that epoch (a bug in the trial: not worth retrying);
    * ``crash_at_epoch`` with ``crash_attempts`` (a list of attempt numbers; absent = every
      attempt): ``os._exit(1)`` at the start of that epoch when ``spec.attempt`` is listed,
      as a killed worker would;
    * numeric hyperparameters scored by :func:`sleep_objective`; other keys are ignored.

    Each epoch reports ``val_accuracy`` (:func:`sleep_val_accuracy`), ``val_loss`` and
    ``epoch``, after writing ``{"epoch", "metrics"}`` to ``sleep_checkpoint.json`` in
    ``spec.checkpoint_dir`` (if set; atomically). A later attempt resumes after the last
    checkpointed epoch and reports only the remaining ones.
    """
    config = spec.config
    epochs = _int_setting(config, "epochs", 1)
    assert epochs is not None
    sleep_s = config.get("sleep_s", 0.0)
    if not isinstance(sleep_s, int | float) or isinstance(sleep_s, bool) or not sleep_s >= 0:
        raise ValueError(f"sleep runner: sleep_s must be a number >= 0, got {sleep_s!r}")
    fail_at = _int_setting(config, "fail_at_epoch", None)
    crash_at = _int_setting(config, "crash_at_epoch", None)
    crash_attempts = config.get("crash_attempts")
    if crash_attempts is not None and (
        not isinstance(crash_attempts, list | tuple)
        or not all(isinstance(a, int) and not isinstance(a, bool) for a in crash_attempts)
    ):
        raise ValueError(
            f"sleep runner: crash_attempts must be a list of ints, got {crash_attempts!r}"
        )
    start = time.perf_counter()
    yield {"kind": "started", "env": describe_environment(spec)}
    quality = sleep_objective(config)
    ckpt = Path(spec.checkpoint_dir) / SLEEP_CHECKPOINT_NAME if spec.checkpoint_dir else None
    saved = _load_json(ckpt) if ckpt is not None else None
    done = int(saved["epoch"]) if saved is not None else 0
    metrics: dict[str, Any] = dict(saved["metrics"]) if saved is not None else {}
    for epoch in range(done + 1, epochs + 1):
        if fail_at == epoch:
            raise RuntimeError(f"injected failure at epoch {epoch}")
        if crash_at == epoch and (crash_attempts is None or spec.attempt in crash_attempts):
            # A killed worker, as the executor sees one: no exception, no cleanup.
            os._exit(1)
        if sleep_s:
            time.sleep(float(sleep_s))
        accuracy = sleep_val_accuracy(quality, epoch, epochs)
        metrics = {"epoch": float(epoch), "val_accuracy": accuracy, "val_loss": 1.0 - accuracy}
        if ckpt is not None:
            _save_json_atomic(ckpt, {"version": 1, "epoch": epoch, "metrics": metrics})
        yield {"kind": "report", "epoch": epoch, "metrics": _json_metrics(metrics)}
    final = dict(metrics)
    final["test_accuracy"] = final.get("val_accuracy", 0.1)
    final["wall_time"] = time.perf_counter() - start
    yield {"kind": "result", "metrics": _json_metrics(final), "stopped": False, "epochs": epochs}


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("epoch"), int):
        raise ValueError(f"{path} is not a sleep-runner checkpoint")
    return data


def _save_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON next to ``path`` then ``os.replace`` it in: readers see old or new, never
    half a file. No fsync: the sleep runner's checkpoints must survive a killed worker (the
    page cache does), not a power cut, and an fsync per epoch was most of a zero-work
    trial's cost on its worker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
