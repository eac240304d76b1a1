from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tsam_core.models import MODELS, build_model

DIGITS_SHAPE = (1, 8, 8)
CIFAR_SHAPE = (3, 32, 32)
CONV_MODELS = [name for name in MODELS if name != "mlp"]
# Widths small enough for the vmap tests to be quick: wrn16_8 width is the widen factor.
SMALL = {"mlp": 16, "cnn": 4, "resnet18": 4, "wrn16_8": 1}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@functools.cache
def _full_size(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Default-width models are built once per session: initialising 11M weights is slow."""
    torch.manual_seed(0)
    return build_model(name, input_shape=input_shape, num_classes=num_classes)


@pytest.mark.parametrize("name", MODELS)
def test_forward_on_digits_shaped_input_gives_one_logit_per_class(name: str) -> None:
    with torch.no_grad():
        out = _full_size(name, DIGITS_SHAPE, 10)(torch.randn(2, *DIGITS_SHAPE))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", CONV_MODELS)
def test_forward_on_cifar_shaped_input_gives_one_logit_per_class(name: str) -> None:
    with torch.no_grad():
        out = _full_size(name, CIFAR_SHAPE, 100)(torch.randn(2, *CIFAR_SHAPE))
    assert out.shape == (2, 100)


def test_mlp_has_the_specified_layers_and_width_overrides_the_hidden_size() -> None:
    default = build_model("mlp", input_shape=DIGITS_SHAPE, num_classes=10)
    linears = [m for m in default.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 256), (256, 256), (256, 10)]
    narrow = build_model("mlp", input_shape=DIGITS_SHAPE, num_classes=10, width=32)
    linears = [m for m in narrow.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 10)]


def test_wrn16_8_has_the_papers_size() -> None:
    # WRN-16-8 has 11.0M parameters (Zagoruyko & Komodakis, table 4); one more unit per group,
    # as in davda54/sam's file, would give 17.1M.
    model = _full_size("wrn16_8", CIFAR_SHAPE, 100)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.0e6, rel=0.01)


@pytest.mark.parametrize("name", MODELS)
def test_models_contain_no_inplace_modules(name: str) -> None:
    model = build_model(name, input_shape=DIGITS_SHAPE, num_classes=10, width=4)
    for module in model.modules():
        assert not getattr(module, "inplace", False), f"{type(module).__name__} is in-place"
        assert not isinstance(module, nn.Dropout), "dropout is a random op vmap refuses"


def test_vmap_over_stacked_mlp_parameters_matches_separate_forwards() -> None:
    models = [build_model("mlp", input_shape=DIGITS_SHAPE, num_classes=10) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.randn(5, *DIGITS_SHAPE)

    def forward(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = functional_call(models[0], (p, b), (x,))
        return out

    out = vmap(forward)(params, buffers)
    assert out.shape == (3, 5, 10)
    expected = torch.stack([model(x) for model in models])
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_flow_through_vmap_and_functional_call(name: str) -> None:
    # Small widths: this checks that the blocks are vmap-safe (BatchNorm in training mode
    # included, with per-model buffers), not how fast they are. Plain autograd rather than
    # torch.func.grad, whose first call imports torch._dynamo (many seconds on a small CPU).
    models = [
        build_model(name, input_shape=DIGITS_SHAPE, num_classes=10, width=SMALL[name])
        for _ in range(3)
    ]
    params, buffers = stack_module_state(models)
    x = torch.randn(4, *DIGITS_SHAPE)

    def forward(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = functional_call(models[0], (p, b), (x,))
        return out

    logits = vmap(forward)(params, buffers)
    # Cross-entropy, not a square: wrn16_8's zero-initialised head outputs zeros at first.
    labels = torch.arange(4).repeat(3)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels).backward()
    for key, value in params.items():
        assert value.grad is not None, key
        assert value.grad.shape == value.shape
    assert any(float(v.grad.abs().sum()) > 0 for v in params.values() if v.grad is not None)


def test_unknown_model_name_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="name") as info:
        build_model("vit", input_shape=DIGITS_SHAPE, num_classes=10)
    for known in MODELS:
        assert known in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("cnn", {"input_shape": (8, 8)}, "input_shape"),
        ("mlp", {"input_shape": (0, 8)}, "input_shape"),
        ("mlp", {"num_classes": 0}, "num_classes"),
        ("resnet18", {"width": 0}, "width"),
    ],
)
def test_build_model_rejects_bad_arguments(
    name: str, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"input_shape": DIGITS_SHAPE, "num_classes": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_model(name, **args)  # type: ignore[arg-type]
