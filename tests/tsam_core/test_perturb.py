"""The noise laws and the flat draws behind them."""

import math

import pytest
import torch

from tsam_core.perturb import (
    FlatLayout,
    draw_noise,
    fill_noise,
    global_norm,
    randn_like_params,
)

torch.set_num_threads(1)


def _params(dtype=torch.float32):
    return [torch.zeros(40, 30, dtype=dtype), torch.zeros(30, dtype=dtype), torch.zeros(7, 5, 3)]


def test_gaussian_noise_is_normal_with_std_scale_per_coordinate_when_not_clipped():
    params = [torch.zeros(300, 200), torch.zeros(200)]  # 60,200 coordinates
    scale = 0.3
    noise = draw_noise(
        params, "gaussian", scale=scale, radius=1e6, generator=torch.Generator().manual_seed(0)
    )
    flat = torch.cat([n.flatten() for n in noise]).double()
    assert [n.shape for n in noise] == [p.shape for p in params]
    assert abs(flat.mean().item()) < 4 * scale / math.sqrt(flat.numel())
    assert flat.std().item() == pytest.approx(scale, rel=0.02)
    # Normal, not merely the right variance: about 68.3% within one std, 95.4% within two.
    assert (flat.abs() < scale).double().mean().item() == pytest.approx(0.6827, abs=0.01)
    assert (flat.abs() < 2 * scale).double().mean().item() == pytest.approx(0.9545, abs=0.005)


def test_gaussian_noise_is_clipped_to_global_norm_radius_keeping_its_direction():
    params = _params()
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    clipped = draw_noise(params, "gaussian", scale=2.0, radius=0.5, generator=gen_a)
    free = draw_noise(params, "gaussian", scale=2.0, radius=1e9, generator=gen_b)
    assert global_norm(clipped).item() == pytest.approx(0.5, rel=1e-5)
    ratio = global_norm(free) / global_norm(clipped)
    for c, f in zip(clipped, free, strict=True):
        assert torch.allclose(c * ratio, f, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_sphere_noise_has_norm_scale_and_ball_noise_fills_the_ball(scale):
    params = [torch.zeros(2), torch.zeros(1)]  # d = 3, so the radius law U^(1/3) is testable
    gen = torch.Generator().manual_seed(2)
    sphere = [
        draw_noise(params, "sphere", scale=scale, radius=1.0, generator=gen) for _ in range(50)
    ]
    assert all(global_norm(n).item() == pytest.approx(scale, rel=1e-5) for n in sphere)
    radii = torch.stack(
        [
            global_norm(draw_noise(params, "ball", scale=scale, radius=1.0, generator=gen))
            for _ in range(4000)
        ]
    )
    assert radii.max().item() <= scale * (1 + 1e-6)
    # Uniform in a 3-ball: (r / scale)^3 is uniform on [0, 1].
    u = (radii / scale) ** 3
    assert u.mean().item() == pytest.approx(0.5, abs=0.02)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.01)


def test_none_law_draws_nothing_and_bad_law_raises():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert draw_noise(_params(), "none", scale=1.0, radius=1.0, generator=gen) is None
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(ValueError, match="noise"):
        draw_noise(_params(), "uniform", scale=1.0, radius=1.0, generator=gen)
    with pytest.raises(ValueError, match="noise"):
        fill_noise(torch.empty(3), "none", scale=1.0, radius=1.0, generator=gen)


def test_draws_are_reproducible_fresh_and_one_flat_draw_in_parameter_order():
    params = _params()
    a = draw_noise(
        params, "sphere", scale=1.0, radius=1.0, generator=torch.Generator().manual_seed(5)
    )
    gen = torch.Generator().manual_seed(5)
    b = draw_noise(params, "sphere", scale=1.0, radius=1.0, generator=gen)
    c = draw_noise(params, "sphere", scale=1.0, radius=1.0, generator=gen)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(b, c, strict=True))
    # Fresh tensors each call: the second draw did not overwrite the first.
    assert all(
        x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
        for x, y in zip(b, c, strict=True)
    )
    z = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(5))
    flat = torch.cat([x.flatten() for x in a])
    assert torch.allclose(flat, z / z.norm(), atol=1e-7)


def test_mixed_dtypes_draw_in_the_common_dtype_and_land_in_each_parameters_dtype():
    params = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float32)]
    layout = FlatLayout(params, torch.device("cpu"))
    assert layout.dtype == torch.float64 and not layout.in_place
    z = randn_like_params(params, torch.Generator().manual_seed(0))
    assert [(t.shape, t.dtype) for t in z] == [(p.shape, p.dtype) for p in params]
    ref = torch.randn(17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(z[0].flatten(), ref[:12])
    assert torch.equal(z[1], ref[12:].float())


def test_layout_splits_a_block_of_rows_into_views_shaped_like_the_parameters():
    params = _params()
    layout = FlatLayout(params, torch.device("cpu"))
    assert layout.in_place and layout.numel == 1200 + 30 + 105
    block = torch.arange(3 * layout.numel, dtype=torch.float32).view(3, -1)
    parts = layout.split(block)
    assert [p.shape for p in parts] == [(3, *q.shape) for q in params]
    assert all(p.untyped_storage().data_ptr() == block.untyped_storage().data_ptr() for p in parts)
    assert torch.equal(parts[1][2], block[2, 1200:1230])
    rows = layout.split(block[1])
    assert torch.equal(rows[2], block[1, 1230:].view(7, 5, 3))
    assert layout.matches(params, torch.device("cpu"))
    assert not layout.matches(params[:2], torch.device("cpu"))
    assert not layout.matches([p.double() for p in params], torch.device("cpu"))
    assert not layout.matches(params, torch.device("meta"))
