"""Throughput of the whole path -- HTTP submit, scheduler, Ray, database -- against Optuna's own
``study.optimize`` on an RDB storage of the same database, measured in the same run.

    .venv/bin/python bench/scheduler.py                  # SQLite, and PostgreSQL if reachable
    .venv/bin/python bench/scheduler.py --trials 200 --parallel 8

Zero-work trials (``sleep_s = 0``) measure pure overhead; short trials (``--short-s``) show how
close to the ideal wall time ``trials * short_s / parallel`` each system gets. Both sides run
the same number of epochs (reports) per trial and the same parallelism.
"""

from __future__ import annotations

import argparse
import os
import socket
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

from service.app import create_app
from service.settings import Settings
from workers.ray_executor import RayExecutor

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


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
    tick = time.perf_counter()
    study_id = httpx.post(f"{url}/api/v1/studies", json=spec, timeout=30).json()["id"]
    while True:
        status = httpx.get(f"{url}/api/v1/studies/{study_id}", timeout=30).json()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.02)
    wall = time.perf_counter() - tick
    assert status["counts"] == {"complete": trials}, status
    return wall


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
    parser.add_argument("--short-s", type=float, default=0.5, help="duration of a short trial")
    parser.add_argument("--pg", default=os.environ.get("TSAM_TEST_DATABASE_URL", PG_DEFAULT))
    args = parser.parse_args()

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
        f"{args.trials} trials, {args.parallel} in parallel, {args.epochs} reports each; "
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
            for kind, sleep_s in (("zero", 0.0), ("short", args.short_s)):
                ideal = args.trials * sleep_s / args.parallel
                results = {
                    "tsam-sweep": run_ours(url, args.trials, args.parallel, sleep_s, args.epochs),
                    "optuna-rdb": run_optuna(
                        optuna_url, args.trials, args.parallel, sleep_s, args.epochs
                    ),
                }
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
            server.should_exit = True
            time.sleep(1)
    finally:
        ray_root.shutdown()
        for schema in schemas:
            drop_schema(args.pg, schema)


if __name__ == "__main__":
    main()
