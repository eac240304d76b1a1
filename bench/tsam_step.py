"""Per-step cost of ERM, SAM and TSAM, as ratios to the SAM step measured in the same run.

    .venv/bin/python bench/tsam_step.py                 # digits MLP and CNN, CPU
    .venv/bin/python bench/tsam_step.py --device cuda --models resnet18 --batch-size 128

TSAM with the ascent sampler does 2s forward-backward passes against SAM's 2, so ``s`` is the
floor of TSAM/SAM where compute dominates. The machine is shared and noisy, so every variant is
timed in interleaved rounds (one step of each per round, order rotated) and the median is used.
"""

from __future__ import annotations

import argparse
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

LOSS = nn.CrossEntropyLoss()


def make_step(
    kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: int
) -> Callable[[], None]:
    sgd = {"lr": 0.01, "momentum": 0.9}
    if kind == "erm":
        opt = torch.optim.SGD(model.parameters(), **sgd)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            LOSS(model(x), y).backward()
            opt.step()

        return step
    if kind == "sam":
        sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd)
        return lambda: sam.step_on_batch(model, LOSS, x, y) and None
    tsam = TSAM(
        model.parameters(),
        torch.optim.SGD,
        t=1.0,
        samples=s,
        vectorize=kind == "tsam_batch",
        generator=torch.Generator(device=x.device).manual_seed(0),
        **sgd,
    )
    if kind == "tsam_batch":
        return lambda: tsam.step_on_batch(model, LOSS, x, y) and None

    def closure() -> torch.Tensor:
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    return lambda: tsam.step(closure) and None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    name: str, input_shape: tuple[int, ...], args: argparse.Namespace, device: torch.device
) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *input_shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    variants: dict[str, Callable[[], None]] = {}
    for kind in ("erm", "sam"):
        torch.manual_seed(0)
        variants[kind] = make_step(
            kind, build_model(name, input_shape=input_shape, num_classes=10).to(device), x, y, 1
        )
    for s in args.samples:
        for kind in ("tsam_loop", "tsam_batch"):
            torch.manual_seed(0)
            model = build_model(name, input_shape=input_shape, num_classes=10).to(device)
            variants[f"{kind} s={s}"] = make_step(kind, model, x, y, s)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in variants.values():  # warm-up
        for _ in range(args.warmup):
            step()
    sync(device)
    keys = list(variants)
    for r in range(args.rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            sync(device)
            tick = time.perf_counter()
            for _ in range(args.steps):
                variants[k]()
            sync(device)
            times[k].append((time.perf_counter() - tick) / args.steps)
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, threads {args.threads}, "
        f"batch {args.batch_size}, median of {args.rounds} interleaved rounds x {args.steps} steps"
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


if __name__ == "__main__":
    main()
