"""Model registry: the architectures a sweep can train, built by name.

TSAM evaluates the loss at many perturbed copies of the weights, which the trainer batches
with ``torch.func.functional_call`` under ``torch.vmap``. That rules out in-place operations
on activations (``ReLU(inplace=True)``, ``out += shortcut``, in-place dropout): under vmap an
in-place write into a tensor that is not batched the same way as the value written fails, and
in-place ops can also invalidate tensors autograd saved. Every block below is written
out-of-place for that reason. Dropout is left out rather than set to 0 because even a no-op
dropout is a random op, which vmap refuses by default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet18", "wrn16_8")

# What ``width`` means for each model, and its default.
_DEFAULT_WIDTH = {"mlp": 256, "cnn": 32, "resnet18": 64, "wrn16_8": 8}


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, width: int | None = None
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (one example, e.g. (C, H, W)).

    ``width`` scales the model, keeping each architecture's proportions: the hidden units of
    the ``mlp`` (256), the first conv's channels of the ``cnn`` (32; the second conv has 2x,
    the hidden layer 4x), the stem width of ``resnet18`` (64; stages 1x/2x/4x/8x) and the
    widen factor of ``wrn16_8`` (8). The output is logits of shape (batch, num_classes).
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {', '.join(MODELS)}; got {name!r}")
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {shape}")
    if name != "mlp" and len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) for {name}, got {shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if width is not None and width < 1:
        raise ValueError(f"width must be positive, got {width}")
    w = _DEFAULT_WIDTH[name] if width is None else width

    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(shape), w),
            nn.ReLU(),
            nn.Linear(w, w),
            nn.ReLU(),
            nn.Linear(w, num_classes),
        )
    channels = shape[0]
    if name == "cnn":
        return _small_cnn(channels, num_classes, w)
    if name == "resnet18":
        return ResNet18(channels, num_classes, base_width=w)
    return WideResNet(channels, num_classes, depth=16, widen_factor=w)


def _small_cnn(channels: int, num_classes: int, width: int) -> nn.Module:
    """Two conv layers and two linear layers, for 8x8 digits up to 32x32 images.

    The adaptive pool fixes the classifier's input at 4x4 whatever the image size: it is the
    identity after max-pooling an 8x8 input and averages down larger ones, which also keeps
    the first linear layer from growing with the resolution.
    """
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 4 * width),
        nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet v1 basic block: two 3x3 convs with BatchNorm, and a projection shortcut when
    the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        out = self.relu(out)
        return out


class ResNet18(nn.Module):
    """ResNet-18 for small images: a 3x3 stem without max-pool, so 32x32 inputs keep enough
    resolution for four stages (the ImageNet stem would shrink them to 8x8 at once)."""

    def __init__(self, in_channels: int, num_classes: int, base_width: int = 64) -> None:
        super().__init__()
        w = base_width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        stages: list[nn.Module] = []
        in_w = w
        for i, stride in enumerate((1, 2, 2, 2)):
            out_w = w * 2**i
            stages.append(
                nn.Sequential(BasicBlock(in_w, out_w, stride), BasicBlock(out_w, out_w, 1))
            )
            in_w = out_w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_w, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.stages(self.stem(x)))
        return logits


class _PreActUnit(nn.Module):
    """Pre-activation residual unit (BN-ReLU-conv twice) of a WideResNet.

    When the shape changes, the shortcut is a 1x1 conv applied to the *activated* input, as in
    the original WRN and davda54/sam; otherwise it is the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.projection: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated: torch.Tensor = self.relu(self.bn1(x))
        shortcut: torch.Tensor = x if self.projection is None else self.projection(activated)
        out: torch.Tensor = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis) for small images.

    Follows davda54/sam's ``wide_res_net.py`` (pre-activation units, 16-channel stem, final
    BN-ReLU, Kaiming fan-in conv init, zero-initialised classifier, no dropout) with two
    deliberate differences: each group has ``(depth - 4) / 6`` units, the paper's count (that
    file builds one more per group, i.e. a WRN-22 when asked for 16), and the pooling is
    adaptive, so inputs smaller than 32x32 also work.
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int, widen_factor: int) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        units = (depth - 4) // 6
        filters = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, filters[0], 3, 1, padding=1, bias=False)]
        for group, stride in enumerate((1, 2, 2)):
            in_c, out_c = filters[group], filters[group + 1]
            layers.append(_PreActUnit(in_c, out_c, stride))
            layers.extend(_PreActUnit(out_c, out_c, 1) for _ in range(units - 1))
        layers += [
            nn.BatchNorm2d(filters[3]),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(filters[3], num_classes),
        ]
        self.f = nn.Sequential(*layers)
        self._initialize()

    def _initialize(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.f(x)
        return logits
