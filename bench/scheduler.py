"""Throughput of the whole path -- HTTP submit, scheduler, Ray, database -- against Optuna's own
``study.optimize`` on an RDB storage of the same database, measured in the same run.

    .venv/bin/python bench/scheduler.py                  # SQLite, and PostgreSQL if reachable
    .venv/bin/python bench/scheduler.py --trials 200 --parallel 8

A third row, ``ray-only``, pushes the same trials straight through a RayExecutor with no
HTTP, scheduler, Optuna or database: the floor under our numbers on this machine.

Zero-work trials (``sleep_s = 0``) measure pure overhead -- the throughput goal is about
them; short trials (``--short-s``) show how close to the ideal wall time
``trials * short_s / parallel`` each system gets. Both sides run the same number of epochs
(reports) per trial and the same parallelism, interleaved ``--repeats`` times (medians).
Our wall time runs from the moment the server stored the study to the moment it marked it
completed (the server's timestamps), so the client's polling is not in it; Optuna's is the
time of ``study.optimize``. The client that submits and polls is a child process, as a
user's CLI or browser is: on a thread here it would hold the server's interpreter lock for
its own HTTP work (``--client-in-process``: how this benchmark measured until 2026-12-03).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import optuna
import sqlalchemy as sa
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study_client import submit_and_wait

from service.app import create_app
from service.settings import Settings
from workers.executor import Resources
from workers.ray_executor import RayExecutor
from workers.trial import TrialSpec

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CLIENT_IN_PROCESS = False  # --client-in-process


def serve(database_url: str, root: Path, executor: RayExecutor) -> tuple[uvicorn.Server, str]:
    settings = Settings(database_url=database_url, checkpoint_root=str(root / "runs"))
    app = create_app(settings, executor=executor)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def run_ours(url: str, trials: int, parallel: int, sleep_s: float, epochs: int) -> float:
    spec: dict[str, Any] = {
        "name": f"bench-{uuid.uuid4().hex[:6]}",
        "task": {"epochs": epochs},
        "search_space": {
            "lr": {"type": "float", "low": 1e-4, "high": 0.5, "log": True},
            "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
        },
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": trials, "max_parallel": parallel},
        "resources": {"cpus": 2.0 / parallel},
        "runner": {"name": "sleep", "sleep_s": sleep_s / epochs},
    }
    if CLIENT_IN_PROCESS:
        # One client for the run: a bare httpx.get builds a new TLS context per call.
        with httpx.Client(base_url=url, timeout=30) as client:
            return submit_and_wait(client, spec, trials)
    child = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("study_client.py")), url, str(trials)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(child.stdout.strip().splitlines()[-1])


class RayOnly:
    """The floor under our numbers: the same sleep-runner trials straight through a
    RayExecutor (no HTTP, scheduler, Optuna or database), ``parallel`` at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.wake = threading.Event()
        self.executor = RayExecutor()
        self.executor.start(self.wake.set)

    def run(self, trials: int, parallel: int, sleep_s: float, epochs: int) -> float:
        return _ray_only(self, trials, parallel, sleep_s, epochs)


def _ray_only(bench: RayOnly, trials: int, parallel: int, sleep_s: float, epochs: int) -> float:
    executor, wake, root = bench.executor, bench.wake, bench.root
    run_dir = Path(tempfile.mkdtemp(prefix="ray-only-", dir=root))
    resources = Resources(cpus=2.0 / parallel)
    tick = time.perf_counter()
    submitted = done = 0
    live: set[str] = set()
    while done < trials:
        while len(live) < parallel and submitted < trials:
            spec = TrialSpec(
                study_id="ray-only",
                trial_number=submitted,
                attempt=1,
                lease_token="-",
                config={"epochs": epochs, "sleep_s": sleep_s / epochs},
                checkpoint_dir=str(run_dir / str(submitted)),
                runner="sleep",
                prompt_reports=False,  # as the scheduler sends them: the studies have no pruner
            )
            live.add(executor.submit(spec, resources))
            submitted += 1
        wake.wait(1.0)
        wake.clear()
        for event in executor.drain():
            if event.terminal:
                assert event.kind == "result", event
                live.discard(event.run_id)
                done += 1
    return time.perf_counter() - tick


def run_optuna(storage: str, trials: int, parallel: int, sleep_s: float, epochs: int) -> float:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=f"bench-{uuid.uuid4().hex[:6]}",
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 0.5, log=True)
        trial.suggest_float("t", 0.1, 100.0, log=True)
        for epoch in range(1, epochs + 1):
            time.sleep(sleep_s / epochs)
            trial.report(lr, epoch)
        return lr

    tick = time.perf_counter()
    study.optimize(objective, n_trials=trials, n_jobs=parallel)
    return time.perf_counter() - tick


def pg_schema(base: str) -> tuple[str, str] | None:
    try:
        engine = sa.create_engine(base)
        schema = f"tsam_bench_{uuid.uuid4().hex[:8]}"
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        engine.dispose()
    except sa.exc.OperationalError:
        return None
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}", schema


def drop_schema(base: str, schema: str) -> None:
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="reports per trial")
    parser.add_argument(
        "--short-s", type=float, default=0.5, help="duration of a short trial (0: skip them)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs per cell; medians are printed"
    )
    parser.add_argument("--pg", default=os.environ.get("TSAM_TEST_DATABASE_URL", PG_DEFAULT))
    parser.add_argument(
        "--client-in-process",
        action="store_true",
        help="submit and poll from a thread of this process, not a child process",
    )
    args = parser.parse_args()
    global CLIENT_IN_PROCESS
    CLIENT_IN_PROCESS = args.client_in_process

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    root = Path(tempfile.mkdtemp(prefix="tsam-bench-"))
    ray_root = RayExecutor(
        num_cpus=2, warm_workers=0, temp_dir=tempfile.mkdtemp(prefix="tsam-ray-")
    )
    ray_root.start(lambda: None)
    backends: list[tuple[str, str, str]] = [
        ("sqlite", f"sqlite:///{root / 'ours.db'}", f"sqlite:///{root / 'optuna.db'}")
    ]
    schemas = []
    made = pg_schema(args.pg), pg_schema(args.pg)
    if made[0] and made[1]:
        backends.append(("postgres", made[0][0], made[1][0]))
        schemas = [made[0][1], made[1][1]]
    print(
        f"{args.trials} trials, {args.parallel} in parallel, {args.epochs} reports each, "
        f"median of {args.repeats} interleaved runs; "
        f"ideal wall of the short runs {args.trials * args.short_s / args.parallel:.1f} s"
    )
    print(
        f"{'database':<9} {'kind':<6} {'system':<14} {'wall s':>8} {'trials/s':>9} "
        f"{'ms/trial':>9} {'x ideal':>8}"
    )
    try:
        for name, ours_url, optuna_url in backends:
            server, url = serve(ours_url, root, RayExecutor())
            # Warm the Ray workers once so neither side pays process start-up in the timing.
            run_ours(url, args.parallel, args.parallel, 0.0, 1)
            ray_only = RayOnly(root)
            ray_only.run(args.parallel, args.parallel, 0.0, 1)
            for kind, sleep_s in (("zero", 0.0), ("short", args.short_s)):
                if kind == "short" and args.short_s <= 0:
                    continue
                ideal = args.trials * sleep_s / args.parallel
                walls: dict[str, list[float]] = {"tsam-sweep": [], "optuna-rdb": [], "ray-only": []}
                for _ in range(args.repeats):  # interleaved, so load drift hits all sides
                    # Ray keeps only num_cpus idle workers and ends the others after about a
                    # second idle, so `parallel` fractional-CPU trials would pay new worker
                    # processes after every pause; `parallel` untimed trials that overlap
                    # (0.3 s each) first bring them all back.
                    run_ours(url, args.parallel, args.parallel, 0.3, 1)
                    walls["tsam-sweep"].append(
                        run_ours(url, args.trials, args.parallel, sleep_s, args.epochs)
                    )
                    walls["optuna-rdb"].append(
                        run_optuna(optuna_url, args.trials, args.parallel, sleep_s, args.epochs)
                    )
                    ray_only.run(args.parallel, args.parallel, 0.3, 1)
                    walls["ray-only"].append(
                        ray_only.run(args.trials, args.parallel, sleep_s, args.epochs)
                    )
                results = {system: statistics.median(w) for system, w in walls.items()}
                for system, wall in results.items():
                    over = (wall - ideal) * args.parallel / args.trials * 1e3
                    ratio = f"{wall / ideal:.2f}" if ideal else ""
                    print(
                        f"{name:<9} {kind:<6} {system:<14} {wall:>8.2f} {args.trials / wall:>9.1f} "
                        f"{over:>9.1f} {ratio:>8}",
                        flush=True,
                    )
                speedup = results["optuna-rdb"] / results["tsam-sweep"]
                label = "throughput x"
                print(f"{name:<9} {kind:<6} {label:<14} {speedup:>8.2f}  (ours / optuna-rdb)")
                # Each round runs both sides back to back, so a round's own ratio shares its
                # spell of load; their median is steadier than the ratio of the medians.
                pairs = zip(walls["optuna-rdb"], walls["tsam-sweep"], strict=True)
                rounds = [optuna_wall / ours_wall for optuna_wall, ours_wall in pairs]
                spread = f"rounds {min(rounds):.2f}-{max(rounds):.2f}"
                print(
                    f"{name:<9} {kind:<6} {label:<14} {statistics.median(rounds):>8.2f}  "
                    f"(ours / optuna-rdb, median of per-round ratios; {spread})"
                )
                ceiling = results["optuna-rdb"] / results["ray-only"]
                print(f"{name:<9} {kind:<6} {label:<14} {ceiling:>8.2f}  (ray-only / optuna-rdb)")
            server.should_exit = True
            ray_only.executor.shutdown()
            time.sleep(1)
    finally:
        ray_root.shutdown()
        for schema in schemas:
            drop_schema(args.pg, schema)


if __name__ == "__main__":
    main()
