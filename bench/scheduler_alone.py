"""The scheduler alone: zero-work trials on the in-process executor (threads, no Ray, no HTTP),
so what is timed is the scheduler's own work -- Optuna ask/tell and the database writes.

    .venv/bin/python bench/scheduler_alone.py                       # SQLite, 200 trials
    .venv/bin/python bench/scheduler_alone.py --pg --trials 600     # PostgreSQL too
    .venv/bin/python bench/scheduler_alone.py --profile             # cProfile of the passes

The passes run on this thread (not the scheduler's own) so ``--profile`` sees them.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler import PG_DEFAULT, drop_schema, pg_schema

from service.db import Database
from service.migrate import upgrade
from service.scheduler import Scheduler
from service.studies import service as studies
from service.studies.models import Study
from service.studies.spec import StudySpec
from workers.executor import InProcessExecutor


def run(url: str, trials: int, parallel: int, profile: cProfile.Profile | None) -> float:
    upgrade(url)
    db = Database(url)
    spec = StudySpec.model_validate(
        {
            "name": "scheduler-alone",
            "task": {"epochs": 3},
            "search_space": {
                "lr": {"type": "float", "low": 1e-4, "high": 0.5, "log": True},
                "t": {"type": "float", "low": 0.1, "high": 100.0, "log": True},
            },
            "sampler": {"name": "random", "seed": 0},
            "budget": {"n_trials": trials, "max_parallel": parallel},
            "resources": {"cpus": 1},
            "runner": {"name": "sleep", "sleep_s": 0.0},
        }
    )
    root = tempfile.mkdtemp(prefix="tsam-sched-")
    executor = InProcessExecutor(slots=parallel)
    scheduler = Scheduler(db, executor, checkpoint_root=f"{root}/runs")
    executor.start(scheduler.wake)
    study = studies.create_study(db, owner="local", spec=spec)[0]
    tick = time.perf_counter()
    if profile is not None:
        profile.enable()
    status = "queued"
    while status not in ("completed", "failed"):
        scheduler._wake.wait(0.5)
        scheduler._wake.clear()
        scheduler.run_pass()
        with db.read() as session:
            row = session.get(Study, study.pk)
            status = row.status if row is not None else "failed"
    if profile is not None:
        profile.disable()
    wall = time.perf_counter() - tick
    print(
        f"{url.split(':')[0]:<20} {trials} trials in {wall:6.2f} s = {trials / wall:6.1f} "
        f"trials/s, {scheduler.passes} passes, {status}"
    )
    executor.shutdown()
    db.dispose()
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument(
        "--pg", nargs="?", const=os.environ.get("TSAM_TEST_DATABASE_URL", PG_DEFAULT)
    )
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile")
    args = parser.parse_args()
    profile = cProfile.Profile() if args.profile else None
    root = Path(tempfile.mkdtemp(prefix="tsam-sched-"))
    run(f"sqlite:///{root / 'bench.db'}", args.trials, args.parallel, profile)
    if args.pg:
        made = pg_schema(args.pg)
        if made is None:
            print(f"PostgreSQL at {args.pg} is not reachable; skipped")
        else:
            try:
                run(made[0], args.trials, args.parallel, profile)
            finally:
                drop_schema(args.pg, made[1])
    if profile is not None:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
