"""What Ray alone costs per trial here: empty streaming calls, ``--parallel`` in flight.

    .venv/bin/python bench/ray_floor.py
    .venv/bin/python bench/ray_floor.py --calls 400 --items 2 --repeats 7

Each call streams ``--items`` empty items, as a zero-work trial streams its ``started``,
reports and result. Three ways to run a trial are timed side by side (interleaved rounds,
medians):

* ``task``: one streaming task per trial -- what :class:`workers.ray_executor.RayExecutor`
  does (named ``trial:<n>`` as it names them);
* ``actor``: a method call on one of ``--parallel`` long-lived actors, one per slot;
* ``threaded-actor``: the same on actors with ``max_concurrency=2``, which an actor-per-slot
  executor would need so a second call can interrupt a running trial (a sync actor's
  running method cannot be cancelled).

This is the floor under ``bench/scheduler.py``'s ``ray-only`` row, and what an actor per slot
would buy there. The embedded Ray keeps idle workers (as ``RayExecutor`` does), so no round
pays for new worker processes; actors declare no CPUs so that both kinds fit at once (the
resources a call declares do not change its path).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

import ray


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--items", type=int, default=5, help="items each call streams")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=tempfile.mkdtemp(prefix="tsam-ray-"),
        _system_config={"idle_worker_killing_time_threshold_ms": 600_000},
    )
    items = args.items

    @ray.remote(max_retries=0)
    def trial_task(i: int) -> Any:
        # Not `yield from range(...)`: Ray drives the generator with send(), which a
        # range iterator lacks.
        for k in range(items):  # noqa: UP028
            yield k

    @ray.remote
    class Slot:
        def run(self, i: int) -> Any:
            for k in range(items):  # noqa: UP028
                yield k

    pools = {
        "actor": [Slot.options(num_cpus=0).remote() for _ in range(args.parallel)],
        "threaded-actor": [
            Slot.options(num_cpus=0, max_concurrency=2).remote() for _ in range(args.parallel)
        ],
    }
    cpus = 2.0 / args.parallel

    def start(kind: str, i: int, slot: Any) -> Any:
        if kind == "task":
            return trial_task.options(
                num_returns="streaming", num_cpus=cpus, name=f"trial:{i}"
            ).remote(i)
        return slot.run.options(num_returns="streaming", name=f"trial:{i}").remote(i)

    async def run(kind: str, calls: int) -> float:
        free = list(pools.get(kind, [None] * args.parallel))
        gate = asyncio.Semaphore(args.parallel)

        async def one(i: int) -> None:
            async with gate:
                slot = free.pop()
                try:
                    async for ref in start(kind, i, slot):
                        await ref
                finally:
                    free.append(slot)

        tick = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        return calls / (time.perf_counter() - tick)

    kinds = ("task", "actor", "threaded-actor")
    for kind in kinds:  # warm every worker process and actor once
        asyncio.run(run(kind, 4 * args.parallel))
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            rates[kind].append(asyncio.run(run(kind, args.calls)))
    print(
        f"{args.calls} calls x {args.items} items, {args.parallel} in flight, "
        f"median of {args.repeats} interleaved rounds; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'kind':<16} {'calls/s':>8} {'ms/call':>8} {'x task':>7}  rounds")
    base = statistics.median(rates["task"])
    for kind in kinds:
        rate = statistics.median(rates[kind])
        rounds = " ".join(f"{r:.0f}" for r in rates[kind])
        print(
            f"{kind:<16} {rate:>8.1f} {args.parallel / rate * 1e3:>8.1f} "
            f"{rate / base:>7.2f}  {rounds}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
