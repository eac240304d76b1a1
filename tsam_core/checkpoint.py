"""Crash-safe checkpoints.

A trial can be killed at any instant (a worker lost, a study cancelled), and the next attempt
resumes from the last checkpoint. So a checkpoint is written to a temporary file in the same
directory and moved into place with ``os.replace``, which is atomic on POSIX: a reader sees the
old checkpoint or the new one, never half a file. Loading uses ``weights_only=True``, so a
checkpoint can only hold tensors and plain containers, never code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` to ``path`` atomically; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` when there is none yet."""
    target = Path(path)
    if not target.exists():
        return None
    obj = torch.load(target, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{target} is not a tsam checkpoint")
    return obj


def capture_rng(*generators: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG state a training run draws from: torch's global CPU (and CUDA) generator and
    the run's own generators, in order."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(
    state: dict[str, Any], *generators: torch.Generator, device: torch.device | None = None
) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    saved = state["generators"]
    if len(saved) != len(generators):
        raise ValueError("checkpoint holds a different number of generator states")
    for g, s in zip(generators, saved, strict=True):
        g.set_state(s)
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
