"""Per-step cost of ERM, SAM and TSAM, as ratios to the SAM step measured in the same run.

    .venv/bin/python bench/tsam_step.py                 # digits MLP and CNN, CPU
    .venv/bin/python bench/tsam_step.py --models mlp --samples 3 8 --clock cpu --noise none
    .venv/bin/python bench/tsam_step.py --device cuda --models resnet18 --batch-size 128

TSAM with the ascent sampler does 2s forward-backward passes against SAM's 2, so ``s`` is the
floor of TSAM/SAM where compute dominates. The machine is shared and noisy, so every variant is
timed in interleaved rounds (``--steps`` steps of each per round, order rotated) and the median
is used. ``--clock cpu`` times the process's CPU time instead of wall time (CPU device only): on
a loaded machine it leaves out the time other processes hold the core, which wall time does
not. The load average before and after the run is printed last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tsam_core import SAM, TSAM
from tsam_core.models import build_model
from tsam_core.perturb import NOISE_LAWS

LOSS = nn.CrossEntropyLoss()


LR, MOMENTUM = 0.01, 0.9


def make_step(
    kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: int, noise: str = "gaussian"
) -> Callable[[], object]:
    """One optimizer step of ``kind``: ``erm``, ``sam``, ``tsam_loop`` (``TSAM.step`` with a
    closure), ``tsam_batch`` (``TSAM.step_on_batch``, which picks its path per device: the loop
    on CPU, ``vmap`` elsewhere) or ``tsam_vmap`` (``step_on_batch`` forced onto ``vmap``)."""
    if kind == "erm":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            LOSS(model(x), y).backward()
            opt.step()

        return step
    if kind == "sam":
        sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM)
        return lambda: sam.step_on_batch(model, LOSS, x, y)
    tsam = TSAM(
        model.parameters(),
        torch.optim.SGD,
        t=1.0,
        samples=s,
        noise=noise,
        vectorize=kind in ("tsam_batch", "tsam_vmap"),
        vectorize_cpu=kind == "tsam_vmap",
        generator=torch.Generator(device=x.device).manual_seed(0),
        lr=LR,
        momentum=MOMENTUM,
    )
    if kind in ("tsam_batch", "tsam_vmap"):
        return lambda: tsam.step_on_batch(model, LOSS, x, y)

    def closure() -> torch.Tensor:
        loss: torch.Tensor = LOSS(model(x), y)
        loss.backward()
        return loss

    return lambda: tsam.step(closure)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    name: str, input_shape: tuple[int, ...], args: argparse.Namespace, device: torch.device
) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *input_shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    variants: dict[str, Callable[[], object]] = {}
    for kind in ("erm", "sam"):
        torch.manual_seed(0)
        variants[kind] = make_step(
            kind, build_model(name, input_shape=input_shape, num_classes=10).to(device), x, y, 1
        )
    tsam_kinds = (
        ("tsam_loop", "tsam_batch", "tsam_vmap") if args.vmap else ("tsam_loop", "tsam_batch")
    )
    for s in args.samples:
        for kind in tsam_kinds:
            torch.manual_seed(0)
            model = build_model(name, input_shape=input_shape, num_classes=10).to(device)
            variants[f"{kind} s={s}"] = make_step(kind, model, x, y, s, args.noise)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up
        for _ in range(args.warmup):
            step()
    sync(device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    keys = list(variants)
    for r in range(args.rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            sync(device)
            tick = clock()
            for _ in range(args.steps):
                variants[k]()
            sync(device)
            times[k].append((clock() - tick) / args.steps)
    sam_ms = statistics.median(times["sam"]) * 1e3
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts) * 1e3
        s = int(k.split("s=")[1]) if "s=" in k else None
        ratio = med / sam_ms
        rows.append(
            {
                "model": name,
                "variant": k,
                "ms": med,
                "x_sam": ratio,
                "x_sam_per_s": ratio / s if s else None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--samples", nargs="+", type=int, default=[1, 3, 5, 8])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        default=None,
        help="default: 1 8 8 (digits); 3 32 32 for resnet18/wrn16_8",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--noise", default="gaussian", choices=NOISE_LAWS, help="TSAM's initial-noise law"
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="wall time, or the process's CPU time (CPU device only)",
    )
    parser.add_argument(
        "--vmap",
        action="store_true",
        help="also time step_on_batch forced onto vmap (rows tsam_vmap), on CPU too",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu only measures a CPU device")
    load_before = os.getloadavg()
    extra = "".join(
        f", {name} {value}"
        for name, value, default in (
            ("noise", args.noise, "gaussian"),
            ("clock", args.clock, "wall"),
        )
        if value != default
    )
    print(
        f"torch {torch.__version__}, device {device}, threads {args.threads}, "
        f"batch {args.batch_size}, median of {args.rounds} interleaved rounds x {args.steps} steps"
        f"{extra}"
    )
    print(f"{'model':<9} {'variant':<17} {'ms/step':>9} {'x SAM':>7} {'x SAM / s':>10}")
    for name in args.models:
        shape = (
            tuple(args.input_shape)
            if args.input_shape
            else ((3, 32, 32) if name in ("resnet18", "wrn16_8") else (1, 8, 8))
        )
        for row in bench_model(name, shape, args, device):
            per_s = f"{row['x_sam_per_s']:.3f}" if row["x_sam_per_s"] is not None else ""
            line = f"{row['model']:<9} {row['variant']:<17} {row['ms']:>9.3f}"
            print(f"{line} {row['x_sam']:>7.2f} {per_s:>10}", flush=True)
    loads = (" ".join(f"{v:.2f}" for v in la) for la in (load_before, os.getloadavg()))
    print("load average (1, 5, 15 min): before {}, after {}".format(*loads))


if __name__ == "__main__":
    main()
