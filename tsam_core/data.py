"""Dataset registry: fixed splits, seeded label noise, and on-device preprocessing.

A hyperparameter study compares trials, so everything a trial's score depends on except the
hyperparameters must be held fixed. That is why the train/val/test split of every dataset is
drawn from a constant seed, while the ``seed`` a trial passes only drives which training labels
are corrupted: every trial of a study is scored on the very same validation and test examples.

Datasets are small enough to live in memory as tensors, so training code can move them to the
accelerator once and slice batches there; :meth:`Dataset.prepare` then turns stored inputs into
model inputs with tensor ops only (no PIL, no DataLoader workers), on whatever device they are.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DATASETS: tuple[str, ...] = ("digits", "synthetic", "cifar10", "cifar100")

# Seeds of the parts that must not vary between trials or machines.
_SPLIT_SEED = 0
_SYNTHETIC_SEED = 20240601

_SYNTHETIC_CLASSES = 10
_SYNTHETIC_SHAPE = (1, 8, 8)
_SYNTHETIC_MODES = 3  # Gaussian clusters per class: a linear model cannot separate them.
_SYNTHETIC_SPREAD = 0.55  # Scale of the cluster centres relative to unit within-cluster noise.

# Per-channel statistics of the official training images, in [0, 1] units.
_CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_CIFAR_PADDING = 4


@dataclass(frozen=True)
class Split:
    """Inputs and labels of one split, kept together so they cannot be sliced out of step."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset with its splits and what is needed to feed them to a model.

    Label noise lives in ``train`` only, and ``noisy_mask`` records where, so that
    memorisation of the corrupted labels can be measured. ``mean``/``std`` (per channel, in
    [0, 1] units) and ``augment`` describe :meth:`prepare`; they default to "nothing to do",
    which is right for the float-valued digits and synthetic data.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    noisy_mask: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise ValueError("mean and std must have one value per channel")
            if any(s <= 0 for s in self.std):
                raise ValueError("std must be positive")
        if self.noisy_mask.shape != (len(self.train),):
            raise ValueError("noisy_mask must have one entry per training example")

    def prepare(
        self, x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Turn a batch of stored inputs into model inputs, on ``x``'s device.

        uint8 images become floats in [0, 1]; when ``train`` and the dataset augments, each
        image is randomly cropped back to its size from a zero-padded copy and flipped
        horizontally with probability 1/2, the randomness drawn from ``generator`` (any
        device) so a seeded run is reproducible; finally the per-channel ``mean``/``std``
        normalisation is applied. Augmenting before normalising pads with black pixels, as
        the usual torchvision pipeline does. Float inputs without statistics pass through
        unchanged.
        """
        out = x.float().div(255.0) if x.dtype == torch.uint8 else x
        if train and self.augment:
            out = _random_crop_flip(out, padding=_CIFAR_PADDING, generator=generator)
        if self.mean is not None and self.std is not None:
            mean = _channel_values(self.mean, out.device, out.dtype)
            std = _channel_values(self.std, out.device, out.dtype)
            out = (out - mean) / std
        return out


@functools.lru_cache(maxsize=32)
def _channel_values(
    values: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Per-channel constants shaped (1, C, 1, 1), cached per device so that normalising a
    batch does not copy them from the host (a synchronising transfer) at every step."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def _random_crop_flip(
    x: torch.Tensor, *, padding: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Per-example random crop (from a zero-padded copy) and horizontal flip, batched.

    Gathering with index tensors instead of looping over examples keeps it a handful of
    kernel launches per batch on a GPU, not a few per image. Random numbers come from
    ``generator``'s device and are then moved, so a CPU generator can drive augmentation of a
    CUDA batch, and gives the same crops whatever device the batch is on.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    device = generator.device if generator is not None else x.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    top, left, flip = top.to(x.device), left.to(x.device), flip.to(x.device)

    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (N, W)
    # Flipping is reversing the column indices of the crop.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around a slice put their broadcast dims first: (N, H, W, C).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def apply_label_noise(
    y: torch.Tensor, rate: float, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: exactly ``round(rate * N)`` labels, chosen uniformly, are moved
    to a class drawn uniformly from the *other* classes.

    Excluding the true class makes the rate exact (a uniform draw over all classes would leave
    1/num_classes of the "noisy" labels correct). Returns ``(new_labels, mask)`` where ``mask``
    is True at corrupted positions; ``y`` itself is not modified.
    """
    if y.dim() != 1:
        raise ValueError(f"y must be one-dimensional, got shape {tuple(y.shape)}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must hold labels in [0, {num_classes})")
    n = int(y.shape[0])
    n_noisy = round(rate * n)
    labels = y.clone()
    mask = torch.zeros(n, dtype=torch.bool, device=y.device)
    if n_noisy == 0:
        return labels, mask
    device = generator.device
    chosen = torch.randperm(n, generator=generator, device=device)[:n_noisy].to(y.device)
    shift = torch.randint(1, num_classes, (n_noisy,), generator=generator, device=device)
    labels[chosen] = (labels[chosen] + shift.to(y.device, y.dtype)) % num_classes
    mask[chosen] = True
    return labels, mask


def load_dataset(
    name: str,
    *,
    label_noise: float = 0.0,
    seed: int = 0,
    data_dir: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    synthetic_size: int = 2000,
) -> Dataset:
    """Load dataset ``name`` with ``label_noise`` applied to its training split.

    ``val_fraction``/``test_fraction`` are the stratified shares held out of the whole set;
    for CIFAR the test split is the official test set, so ``test_fraction`` is ignored there
    and ``val_fraction`` is carved out of the official training set. ``seed`` changes only
    the label noise; splits are the same for every seed. ``data_dir`` is needed for CIFAR
    only and must already hold torchvision's extracted files: nothing is ever downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {', '.join(DATASETS)}; got {name!r}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{arg} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}"
        )

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    if name in ("digits", "synthetic"):
        if name == "digits":
            x, y = _digits_tensors()
        else:
            if synthetic_size < 2 * _SYNTHETIC_CLASSES:
                raise ValueError(
                    f"synthetic_size must be at least {2 * _SYNTHETIC_CLASSES}, "
                    f"got {synthetic_size}"
                )
            x, y = _synthetic_tensors(synthetic_size)
        train_idx, val_idx, test_idx = _stratified_split(y, (val_fraction, test_fraction))
        train = Split(x[train_idx], y[train_idx])
        val = Split(x[val_idx], y[val_idx])
        test = Split(x[test_idx], y[test_idx])
        num_classes = int(y.max()) + 1
    else:
        x, y, x_test, y_test = _cifar_tensors(name, data_dir)
        train_idx, val_idx = _stratified_split(y, (val_fraction,))
        train = Split(x[train_idx], y[train_idx])
        val = Split(x[val_idx], y[val_idx])
        test = Split(x_test.clone(), y_test.clone())
        num_classes = 10 if name == "cifar10" else 100
        mean, std = _CIFAR_STATS[name]

    for split_name, split in (("train", train), ("val", val), ("test", test)):
        if len(split) == 0:
            raise ValueError(
                f"the {split_name} split of {name} is empty: val_fraction={val_fraction} and "
                f"test_fraction={test_fraction} leave no examples for it"
            )

    generator = torch.Generator().manual_seed(seed)
    noisy_y, noisy_mask = apply_label_noise(train.y, label_noise, num_classes, generator)
    return Dataset(
        name=name,
        train=Split(train.x, noisy_y),
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        noisy_mask=noisy_mask,
        mean=mean,
        std=std,
        augment=name in _CIFAR_STATS,
    )


def _stratified_split(y: torch.Tensor, fractions: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Indices ``(rest, held_out_1, ...)`` taking ``fractions[i]`` of every class for split i.

    Stratifying keeps the class balance of small validation sets; drawing from a fixed seed
    makes the split a property of the dataset rather than of the trial. Indices are sorted
    so that the stored order does not depend on the permutation.
    """
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        start = 0
        for i, fraction in enumerate(fractions, start=1):
            count = round(fraction * members.numel())
            parts[i].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return tuple(torch.sort(torch.cat(part)).values for part in parts)


@functools.lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]; cached because every trial loads it.

    Callers only index these tensors (which copies), so sharing the cached ones is safe.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).div(16.0).reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return x, y


def _synthetic_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced Gaussian-mixture classification with several clusters per class.

    Learnable (clusters are compact) but not trivially so (modes of different classes
    interleave and overlap a little, so no model reaches 100%). Normals are drawn in float64
    from a CPU generator with a fixed seed and then rounded to float32, so SIMD-specific
    float32 sampling paths cannot make the data differ between machines.
    """
    generator = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    dim = math.prod(_SYNTHETIC_SHAPE)
    centres = _SYNTHETIC_SPREAD * torch.randn(
        _SYNTHETIC_CLASSES * _SYNTHETIC_MODES, dim, generator=generator, dtype=torch.float64
    )
    y = torch.arange(size) % _SYNTHETIC_CLASSES
    y = y[torch.randperm(size, generator=generator)]
    mode = torch.randint(0, _SYNTHETIC_MODES, (size,), generator=generator)
    noise = torch.randn(size, dim, generator=generator, dtype=torch.float64)
    x = centres[y * _SYNTHETIC_MODES + mode] + noise
    return x.float().reshape(size, *_SYNTHETIC_SHAPE), y


@functools.lru_cache(maxsize=2)
def _cifar_tensors(
    name: str, data_dir: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official CIFAR train and test sets as uint8 (N, 3, 32, 32) images and int64 labels.

    The files are checked for before torchvision is imported, so a missing directory is
    reported as such whether or not the optional dependency is installed. Cached (a pickle
    load takes seconds) per directory; callers only index the returned tensors.
    """
    if data_dir is None:
        raise ValueError(
            f"data_dir is required for {name}: pass the directory that contains "
            f"{_CIFAR_FOLDERS[name]}/ (the dataset is never downloaded)"
        )
    root = Path(data_dir).expanduser().resolve()
    folder = root / _CIFAR_FOLDERS[name]
    expectation = (
        f"torchvision expects {folder}/ as extracted from {_CIFAR_ARCHIVES[name]} "
        f"(https://www.cs.toronto.edu/~kriz/cifar.html); download and extract it yourself, "
        f"load_dataset never downloads"
    )
    if not folder.is_dir():
        raise RuntimeError(f"{name} not found: searched data_dir {root}. {expectation}")
    try:
        import torchvision
    except ImportError as error:
        raise RuntimeError(
            f"{name} needs torchvision, which is not installed: install the `vision` extra: "
            f"pip install 'tsam-sweep[vision]'"
        ) from error
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(root=str(root), train=True, download=False)
        test = cls(root=str(root), train=False, download=False)
    except RuntimeError as error:
        raise RuntimeError(
            f"{name} files in {folder} are missing or corrupted ({error}). {expectation}"
        ) from error

    def to_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision keeps CIFAR as a (N, H, W, C) uint8 array and a list of labels.
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets, dtype=torch.int64)
        return images, labels

    return (*to_tensors(train), *to_tensors(test))
