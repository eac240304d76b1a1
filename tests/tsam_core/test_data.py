from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tsam_core.data import DATASETS, Dataset, Split, apply_label_noise, load_dataset

DIGITS_SIZE = 1797
# Fingerprint of the synthetic data (torch 2.13, CPU): changes mean results stop being comparable.
SYNTHETIC_FIRST_ROW = [
    -0.8731348514556885,
    -0.9586286544799805,
    1.2562096118927002,
    0.1439491510391235,
]
SYNTHETIC_FIRST_LABELS = [5, 7, 4, 3, 3, 8, 5, 0]


def _rows(split: Split) -> Counter[bytes]:
    """Multiset of (input, label) rows, to compare splits without knowing their indices."""
    keys = torch.cat([split.x.flatten(1), split.y[:, None].to(split.x.dtype)], dim=1)
    return Counter(row.numpy().tobytes() for row in keys)


def _assert_same_split(a: Split, b: Split) -> None:
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.y, b.y)


# --- digits -------------------------------------------------------------------------------------


def test_digits_has_expected_shapes_dtypes_and_classes() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits"
    assert ds.num_classes == 10
    assert ds.input_shape == (1, 8, 8)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert split.x.shape == (len(split), 1, 8, 8)
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    assert len(ds.train) + len(ds.val) + len(ds.test) == DIGITS_SIZE
    assert len(ds.val) == pytest.approx(0.15 * DIGITS_SIZE, abs=10)
    assert len(ds.test) == pytest.approx(0.2 * DIGITS_SIZE, abs=10)
    assert ds.noisy_mask.dtype == torch.bool and not ds.noisy_mask.any()


def test_digits_splits_are_disjoint_and_cover_the_dataset() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    full = Split(
        torch.tensor(raw.data, dtype=torch.float32).div(16.0).reshape(-1, 1, 8, 8),
        torch.tensor(raw.target, dtype=torch.int64),
    )
    ds = load_dataset("digits")
    # Each example of the dataset appears in exactly one split, exactly once.
    assert _rows(ds.train) + _rows(ds.val) + _rows(ds.test) == _rows(full)


def test_digits_splits_are_stratified() -> None:
    ds = load_dataset("digits")
    for split in (ds.val, ds.test):
        counts = torch.bincount(split.y, minlength=10)
        assert int(counts.min()) > 0
        assert int(counts.max()) - int(counts.min()) <= 4


def test_digits_split_does_not_depend_on_seed() -> None:
    a = load_dataset("digits", seed=0, label_noise=0.3)
    b = load_dataset("digits", seed=123, label_noise=0.3)
    assert torch.equal(a.train.x, b.train.x)
    _assert_same_split(a.val, b.val)
    _assert_same_split(a.test, b.test)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.4])
def test_label_noise_corrupts_exactly_the_masked_train_labels(rate: float) -> None:
    clean = load_dataset("digits")
    noisy = load_dataset("digits", label_noise=rate, seed=3)
    n = len(clean.train)
    changed = noisy.train.y != clean.train.y
    # Every masked label moved to a different class, and nothing else moved.
    assert torch.equal(changed, noisy.noisy_mask)
    assert int(changed.sum()) == round(rate * n)
    assert torch.equal(noisy.train.x, clean.train.x)
    _assert_same_split(noisy.val, clean.val)
    _assert_same_split(noisy.test, clean.test)


def test_label_noise_is_reproducible_per_seed_and_differs_across_seeds() -> None:
    a = load_dataset("digits", label_noise=0.2, seed=5)
    b = load_dataset("digits", label_noise=0.2, seed=5)
    c = load_dataset("digits", label_noise=0.2, seed=6)
    assert torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.noisy_mask, b.noisy_mask)
    assert not torch.equal(a.noisy_mask, c.noisy_mask)
    assert not torch.equal(a.train.y, c.train.y)


# --- apply_label_noise --------------------------------------------------------------------------


def test_apply_label_noise_does_not_modify_its_input() -> None:
    y = torch.arange(100) % 10
    before = y.clone()
    new, mask = apply_label_noise(y, 0.3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(y, before)
    assert int(mask.sum()) == 30
    assert torch.equal(new != y, mask)


def test_apply_label_noise_with_rate_zero_is_the_identity() -> None:
    y = torch.arange(50) % 7
    new, mask = apply_label_noise(y, 0.0, 7, torch.Generator().manual_seed(0))
    assert torch.equal(new, y)
    assert new is not y
    assert mask.dtype == torch.bool and mask.shape == (50,) and not mask.any()


def test_apply_label_noise_draws_uniformly_from_the_other_classes() -> None:
    y = torch.zeros(9000, dtype=torch.int64)
    new, mask = apply_label_noise(y, 0.5, 10, torch.Generator().manual_seed(1))
    counts = torch.bincount(new[mask], minlength=10)
    assert int(counts[0]) == 0
    # 4500 draws over 9 classes: 500 expected each, sd ~21.
    assert int(counts[1:].min()) > 400 and int(counts[1:].max()) < 600


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 1.0}, "rate"),
        ({"rate": -0.1}, "rate"),
        ({"num_classes": 1}, "num_classes"),
        ({"y": torch.tensor([0, 10])}, "y"),
        ({"y": torch.zeros(2, 2, dtype=torch.int64)}, "y"),
    ],
)
def test_apply_label_noise_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"y": torch.arange(10), "rate": 0.1, "num_classes": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        apply_label_noise(generator=torch.Generator(), **args)  # type: ignore[arg-type]


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_is_identical_across_calls_and_seeds() -> None:
    a = load_dataset("synthetic")
    b = load_dataset("synthetic", seed=9)
    for split_a, split_b in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(split_a.x, split_b.x)
        assert torch.equal(split_a.y, split_b.y)


def test_synthetic_has_expected_shapes_and_size() -> None:
    ds = load_dataset("synthetic", synthetic_size=500)
    assert ds.num_classes == 10
    assert ds.input_shape == (1, 8, 8)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 500
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64


def test_synthetic_data_is_pinned() -> None:
    # The data must be bit-for-bit the same on every machine: pin a fingerprint of it.
    ds = load_dataset("synthetic")
    assert ds.train.x[0, 0, 0, :4].tolist() == pytest.approx(SYNTHETIC_FIRST_ROW, abs=1e-6)
    assert ds.train.y[:8].tolist() == SYNTHETIC_FIRST_LABELS


def test_synthetic_is_learnable_but_not_linearly_trivial() -> None:
    ds = load_dataset("synthetic")
    # Nearest class mean: a linear rule, far above chance yet far from perfect.
    means = torch.stack([ds.train.x[ds.train.y == c].flatten(1).mean(0) for c in range(10)])
    predicted = torch.cdist(ds.val.x.flatten(1), means).argmin(1)
    accuracy = float((predicted == ds.val.y).float().mean())
    assert 0.3 < accuracy < 0.9


# --- argument checking --------------------------------------------------------------------------


def test_unknown_dataset_name_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="name") as info:
        load_dataset("mnist")
    for known in DATASETS:
        assert known in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_noise": 1.0}, "label_noise"),
        ({"label_noise": -0.01}, "label_noise"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"synthetic_size": 5}, "synthetic_size"),
    ],
)
def test_load_dataset_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("synthetic", **kwargs)  # type: ignore[arg-type]


# --- cifar --------------------------------------------------------------------------------------


def test_cifar_without_data_dir_asks_for_it() -> None:
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("cifar10")


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_in_an_empty_dir_names_the_dir_and_the_expected_folder(
    tmp_path: Path, name: str, folder: str
) -> None:
    with pytest.raises(RuntimeError) as info:
        load_dataset(name, data_dir=str(tmp_path))
    assert str(tmp_path.resolve()) in str(info.value)
    assert folder in str(info.value)
    assert "never downloads" in str(info.value)


def test_cifar_with_bad_files_reports_the_dir_or_the_missing_extra(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(RuntimeError) as info:
        load_dataset("cifar10", data_dir=str(tmp_path))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert "tsam-sweep[vision]" in str(info.value)
    else:
        assert str(tmp_path.resolve()) in str(info.value)


def test_cifar_without_torchvision_names_the_vision_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(RuntimeError, match=r"pip install 'tsam-sweep\[vision\]'"):
        load_dataset("cifar10", data_dir=str(tmp_path))


# --- prepare ------------------------------------------------------------------------------------


def _cifar_like(n: int = 4, size: int = 8) -> Dataset:
    x = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0))
    split = Split(x.to(torch.uint8), torch.arange(n) % 10)
    return Dataset(
        name="cifar10",
        train=split,
        val=split,
        test=split,
        num_classes=10,
        input_shape=(3, size, size),
        noisy_mask=torch.zeros(n, dtype=torch.bool),
        mean=(0.5, 0.4, 0.3),
        std=(0.25, 0.2, 0.1),
        augment=True,
    )


def test_prepare_normalizes_uint8_per_channel_without_augmenting_at_eval() -> None:
    ds = _cifar_like()
    out = ds.prepare(ds.test.x, train=False)
    assert out.dtype == torch.float32
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.2, 0.1]).view(1, 3, 1, 1)
    # (torch.testing.assert_close would lazily import torch.distributed: seconds on a small CPU.)
    assert torch.allclose(out, (ds.test.x.float() / 255.0 - mean) / std, atol=1e-6)


def test_prepare_augmentation_keeps_shape_and_is_deterministic_per_generator() -> None:
    ds = _cifar_like(n=16)
    a = ds.prepare(ds.train.x, train=True, generator=torch.Generator().manual_seed(1))
    b = ds.prepare(ds.train.x, train=True, generator=torch.Generator().manual_seed(1))
    c = ds.prepare(ds.train.x, train=True, generator=torch.Generator().manual_seed(2))
    assert a.shape == ds.train.x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ds.prepare(ds.train.x, train=True).shape == ds.train.x.shape  # default generator


def test_prepare_augmentation_is_a_crop_of_the_padded_image_possibly_flipped() -> None:
    ds = Dataset(**{**_cifar_like(n=6).__dict__, "mean": None, "std": None})
    x = ds.train.x.float() / 255.0
    out = ds.prepare(ds.train.x, train=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    size = x.shape[-1]
    for image, source in zip(out, padded, strict=True):
        candidates = [
            crop.flip(-1) if flipped else crop
            for top in range(9)
            for left in range(9)
            for crop in [source[:, top : top + size, left : left + size]]
            for flipped in (False, True)
        ]
        assert any(torch.equal(image, candidate) for candidate in candidates)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prepare_on_gpu_with_a_cpu_generator_matches_prepare_on_cpu() -> None:
    ds = _cifar_like(n=16)
    on_cpu = ds.prepare(ds.train.x, train=True, generator=torch.Generator().manual_seed(3))
    on_gpu = ds.prepare(ds.train.x.cuda(), train=True, generator=torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-6)
    cuda_generator = torch.Generator(device="cuda").manual_seed(3)
    assert ds.prepare(ds.train.x.cuda(), train=True, generator=cuda_generator).shape == (
        16,
        3,
        8,
        8,
    )


def test_prepare_is_the_identity_for_float_datasets() -> None:
    ds = load_dataset("digits")
    batch = ds.train.x[:5]
    assert torch.equal(ds.prepare(batch, train=True), batch)
    assert torch.equal(ds.prepare(batch, train=False), batch)
