"""The one training loop every trial runs: ``train(config, report) -> TrainResult``.

It reads top to bottom: build data, model and optimizer from the config; resume from a
checkpoint if one exists; for each epoch, take the steps, evaluate, checkpoint, then report
(a checkpoint exists before the epoch is reported, so a report never refers to lost work); at
the end, measure test accuracy and flatness. ``report`` may return ``True`` or ``"stop"`` to
stop early (pruning).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsam_core import checkpoint
from tsam_core.config import RESUMABLE_FIELDS, TrainConfig
from tsam_core.data import Dataset, load_dataset
from tsam_core.models import build_model
from tsam_core.sam import SAM
from tsam_core.sharpness import flatness_report
from tsam_core.tsam import TSAM

__all__ = ["Report", "TrainConfig", "TrainResult", "iter_train", "train"]

Metrics = dict[str, float]
Report = Callable[[int, Metrics], Any]
EVAL_CHUNK = 2048


@dataclass
class TrainResult:
    """What a run produced: final metrics, the per-epoch history and whether it was stopped."""

    metrics: Metrics
    history: list[Metrics] = field(default_factory=list)
    stopped: bool = False
    epochs_completed: int = 0
    checkpoint_path: str | None = None


def lr_factor(step: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (a pure function, so resuming from a
    checkpoint at any step gives the same rate)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    return 1.0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _build_optimizer(
    config: TrainConfig, model: nn.Module, total_steps: int, noise_gen: torch.Generator
) -> torch.optim.Optimizer:
    base: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.base == "sgd":
        base, kwargs["momentum"] = torch.optim.SGD, config.momentum
    else:
        base = torch.optim.AdamW
    if config.method == "erm":
        return base(model.parameters(), **kwargs)
    if config.method == "sam":
        return SAM(model.parameters(), base, rho=config.rho, adaptive=config.adaptive, **kwargs)
    return TSAM(
        model.parameters(),
        base,
        t=config.t,
        rho=config.rho,
        samples=config.samples,
        noise=config.noise,
        noise_scale=config.noise_scale,
        noise_radius=config.noise_radius,
        sampler=config.sampler,
        delta=config.delta,
        hmc_steps=config.hmc_steps,
        hmc_step_size=config.hmc_step_size,
        momentum_std=config.momentum_std,
        t_schedule=config.t_schedule,
        total_steps=total_steps,
        generator=noise_gen,
        vectorize=config.vectorize,
        **kwargs,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module
) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions) of ``model`` in eval mode on one split."""
    was_training = model.training
    model.eval()
    total, correct, preds = 0.0, 0, []
    for i in range(0, len(y), EVAL_CHUNK):
        out = model(data.prepare(x[i : i + EVAL_CHUNK], train=False))
        target = y[i : i + EVAL_CHUNK]
        total += float(loss_fn(out, target)) * len(target)
        pred = out.argmax(dim=1)
        correct += int((pred == target).sum())
        preds.append(pred)
    model.train(was_training)
    return total / len(y), correct / len(y), torch.cat(preds)


def train(config: TrainConfig, report: Report | None = None) -> TrainResult:
    """Train one model as ``config`` says; resume from ``config.checkpoint_dir`` if it holds a
    checkpoint of the same config. ``report(epoch, metrics)`` is called after every epoch;
    returning ``True``, ``"stop"`` or ``"prune"`` stops the run there."""
    run = iter_train(config)
    try:
        epoch, metrics = next(run)
        while True:
            answer = report(epoch, metrics) if report is not None else None
            epoch, metrics = run.send(answer in (True, "stop", "prune"))
    except StopIteration as done:
        result: TrainResult = done.value
        return result


def iter_train(config: TrainConfig) -> Generator[tuple[int, Metrics], bool | None, TrainResult]:
    """The training run as a generator: yields ``(epoch, metrics)`` after each epoch (after its
    checkpoint is written) and returns the :class:`TrainResult`. Sending ``True`` back stops
    the run early. Trial runners iterate this to stream reports."""
    start = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = _device(config.device)
    data = load_dataset(
        config.dataset,
        label_noise=config.label_noise,
        seed=config.seed if config.data_seed is None else config.data_seed,
        data_dir=config.data_dir,
    )
    train_x, train_y = data.train.x.to(device), data.train.y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)

    torch.manual_seed(config.seed)
    model = build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)
    model.to(device)
    # Separate streams, so a change in one (e.g. the number of TSAM samples) does not reshuffle
    # the data order of an otherwise identical run.
    shuffle_gen = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(config.seed + 2)
    steps_per_epoch = math.ceil(len(train_y) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = _build_optimizer(config, model, total_steps, noise_gen)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.lr_schedule)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    history: list[Metrics] = []
    first_epoch = 1
    ckpt_path = (
        Path(config.checkpoint_dir) / checkpoint.CHECKPOINT_NAME if config.checkpoint_dir else None
    )
    saved = checkpoint.load(ckpt_path) if ckpt_path else None
    if saved is not None:
        _check_same_config(saved["config"], config)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoint.restore_rng(saved["rng"], shuffle_gen, noise_gen, aug_gen, device=device)
        history = list(saved["history"])
        first_epoch = int(saved["epoch"]) + 1

    stopped = False
    for epoch in range(first_epoch, config.epochs + 1):
        metrics = _train_epoch(
            model,
            optimizer,
            scheduler,
            data,
            train_x,
            train_y,
            loss_fn,
            config,
            shuffle_gen,
            aug_gen,
        )
        metrics["epoch"] = float(epoch)
        metrics["val_loss"], metrics["val_accuracy"], _ = evaluate(
            model, data, val_x, val_y, loss_fn
        )
        if config.eval_train:
            loss, acc, preds = evaluate(model, data, train_x, train_y, loss_fn)
            metrics["train_loss"], metrics["train_accuracy"] = loss, acc
            noisy = data.noisy_mask.to(device)
            if bool(noisy.any()):
                # Share of corrupted examples predicted as their wrong label: memorisation.
                metrics["noisy_memorized"] = float((preds[noisy] == train_y[noisy]).float().mean())
        previous_best = max((h["val_accuracy"] for h in history), default=-1.0)
        metrics["best_val_accuracy"] = max(previous_best, metrics["val_accuracy"])
        history.append(metrics)
        if ckpt_path is not None:
            checkpoint.save_atomic(
                {
                    "version": 1,
                    "config": config.to_dict(),
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": checkpoint.capture_rng(shuffle_gen, noise_gen, aug_gen, device=device),
                    "history": history,
                },
                ckpt_path,
            )
        if (yield epoch, dict(metrics)):
            stopped = True
            break

    final: Metrics = dict(history[-1]) if history else {}
    if not stopped:
        final.update(_final_metrics(model, data, loss_fn, config, device))
    final["wall_time"] = time.perf_counter() - start
    return TrainResult(
        metrics=final,
        history=history,
        stopped=stopped,
        epochs_completed=len(history),
        checkpoint_path=str(ckpt_path) if ckpt_path else None,
    )


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: Dataset,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    config: TrainConfig,
    shuffle_gen: torch.Generator,
    aug_gen: torch.Generator,
) -> Metrics:
    model.train()
    tick = time.perf_counter()
    order = torch.randperm(len(y), generator=shuffle_gen).to(y.device)
    step_losses: list[torch.Tensor] = []
    tilted: list[torch.Tensor] = []
    entropy: list[torch.Tensor] = []
    lr = optimizer.param_groups[0]["lr"]
    for i in range(0, len(y), config.batch_size):
        idx = order[i : i + config.batch_size]
        inputs = data.prepare(x[idx], train=True, generator=aug_gen)
        targets = y[idx]
        if isinstance(optimizer, SAM | TSAM):
            loss = optimizer.step_on_batch(model, loss_fn, inputs, targets)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
        step_losses.append(loss.detach())
        if isinstance(optimizer, TSAM):
            assert optimizer.last_tilted_loss is not None and optimizer.last_entropy is not None
            tilted.append(optimizer.last_tilted_loss)
            entropy.append(optimizer.last_entropy)
        scheduler.step()
    # One host sync per epoch, not per step.
    metrics: Metrics = {
        "step_loss": float(torch.stack(step_losses).mean()),
        "lr": float(lr),
        "epoch_time": time.perf_counter() - tick,
    }
    if tilted:
        metrics["tilted_loss"] = float(torch.stack(tilted).mean())
        metrics["weight_entropy"] = float(torch.stack(entropy).mean())
        metrics["t"] = float(optimizer.current_t) if isinstance(optimizer, TSAM) else math.nan
    if not math.isfinite(metrics["step_loss"]):
        raise FloatingPointError(f"training diverged: step loss is {metrics['step_loss']}")
    return metrics


def _final_metrics(
    model: nn.Module, data: Dataset, loss_fn: nn.Module, config: TrainConfig, device: torch.device
) -> Metrics:
    test_x, test_y = data.test.x.to(device), data.test.y.to(device)
    out: Metrics = {}
    out["test_loss"], out["test_accuracy"], _ = evaluate(model, data, test_x, test_y, loss_fn)
    if config.sharpness_examples > 0:
        n = min(config.sharpness_examples, len(data.train))
        x = data.prepare(data.train.x[:n].to(device), train=False)
        batches = [
            (x[i : i + EVAL_CHUNK], data.train.y[i : min(i + EVAL_CHUNK, n)].to(device))
            for i in range(0, n, EVAL_CHUNK)
        ]
        tilt_t = config.t if config.method == "tsam" and math.isfinite(config.t) else None
        out.update(
            flatness_report(
                model,
                loss_fn,
                batches,
                sigmas=config.sharpness_sigmas,
                n_draws=config.sharpness_draws,
                hessian_k=config.hessian_topk,
                tilt_t=tilt_t,
                tilt_rho=config.rho,
                generator=torch.Generator().manual_seed(config.seed + 3),
            )
        )
    return out


def _check_same_config(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.to_dict()
    differing = sorted(
        k for k in current if k not in RESUMABLE_FIELDS and _norm(saved.get(k)) != _norm(current[k])
    )
    if differing:
        raise ValueError(
            f"the checkpoint in {config.checkpoint_dir} was written by a different config "
            f"(differs in {differing}); use another checkpoint_dir"
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
