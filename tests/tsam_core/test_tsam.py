"""TSAM against its definition, its limits (SAM, the base optimizer) and its two code paths."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from tsam_core import SAM, TSAM, _vectorized
from tsam_core._wrapper import update_batchnorm_stats
from tsam_core.perturb import draw_noise
from tsam_core.tilt import tilted_weights
from tsam_core.tsam import streamed_weight

torch.set_num_threads(1)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _batch(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


LOSS = nn.CrossEntropyLoss()


def _closure(model, x, y):
    def closure():
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    return closure


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b, atol=1e-6):
    for pa, pb in zip(a, b, strict=True):
        assert torch.allclose(pa, pb, atol=atol, rtol=1e-5), (pa - pb).abs().max()


def _pair(factory=_mlp, **kw):
    """Two identical models with TSAM optimizers seeded identically. ``step_on_batch`` of
    either takes the vectorized path, on CPU too, unless ``vectorize_cpu=False`` is passed."""
    models, opts = [], []
    for _ in range(2):
        m = factory()
        kw2 = dict(kw)
        kw2.setdefault("lr", 0.1)
        kw2.setdefault("vectorize_cpu", True)
        opts.append(
            TSAM(m.parameters(), torch.optim.SGD, generator=torch.Generator().manual_seed(7), **kw2)
        )
        models.append(m)
    return models, opts


@pytest.mark.parametrize("path", ["closure", "batch", "batch-vmap"])
def test_one_sample_without_noise_equals_sam_exactly(path):
    x, y = _batch()
    m_t, m_s = _mlp(), _mlp()
    tsam = TSAM(
        m_t.parameters(),
        torch.optim.SGD,
        t=5.0,
        rho=0.1,
        samples=1,
        noise="none",
        lr=0.1,
        momentum=0.9,
        vectorize_cpu=path == "batch-vmap",
    )
    sam = SAM(m_s.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    assert tsam.vectorizes(tsam._params()) == (path == "batch-vmap")
    for _ in range(5):
        if path == "closure":
            tsam.step(_closure(m_t, x, y))
            sam.step(_closure(m_s, x, y))
        else:
            tsam.step_on_batch(m_t, LOSS, x, y)
            sam.step_on_batch(m_s, LOSS, x, y)
    _assert_same(_params(m_t), _params(m_s), atol=1e-6)
    if path != "batch-vmap":  # the same kernels in the same order: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(_params(m_t), _params(m_s), strict=True))


@pytest.mark.parametrize("path", ["closure", "batch"])
def test_zero_rho_without_noise_or_sampler_equals_the_base_optimizer(path):
    x, y = _batch()
    m_t, m_b = _mlp(), _mlp()
    tsam = TSAM(
        m_t.parameters(),
        torch.optim.SGD,
        t=3.0,
        rho=0.0,
        samples=3,
        noise="none",
        sampler="none",
        lr=0.1,
        momentum=0.9,
    )
    base = torch.optim.SGD(m_b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        if path == "closure":
            tsam.step(_closure(m_t, x, y))
        else:
            tsam.step_on_batch(m_t, LOSS, x, y)
        base.zero_grad()
        LOSS(m_b(x), y).backward()
        base.step()
    _assert_same(_params(m_t), _params(m_b), atol=1e-6)


def _per_sample(model, x, y, noises):
    """(losses, grads) at theta + eps_j, computed directly."""
    losses, grads = [], []
    for eps in noises:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, e in zip(m.parameters(), eps, strict=True):
                p.add_(e)
        loss = LOSS(m(x), y)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    return torch.tensor(losses), grads


@pytest.mark.parametrize("t", [0.0, 2.0, math.inf])
def test_update_is_the_tilted_average_of_per_sample_gradients(t):
    x, y = _batch()
    model = _mlp()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    noise_gen = torch.Generator().manual_seed(3)
    opt = TSAM(
        model.parameters(),
        torch.optim.SGD,
        t=t,
        samples=4,
        noise="sphere",
        noise_scale=0.5,
        sampler="none",
        generator=gen,
        lr=1.0,
    )
    noises = [
        draw_noise(list(ref.parameters()), "sphere", scale=0.5, radius=1.0, generator=noise_gen)
        for _ in range(4)
    ]
    losses, grads = _per_sample(ref, x, y, noises)
    if t == 0:
        w = torch.full((4,), 0.25)
    elif math.isinf(t):
        w = torch.nn.functional.one_hot(losses.argmax(), 4).float()
    else:
        w = torch.softmax(t * losses, 0)
    opt.step(_closure(model, x, y))
    expected = [
        p - sum(w[j] * grads[j][i] for j in range(4)) for i, p in enumerate(ref.parameters())
    ]
    _assert_same(_params(model), expected, atol=1e-5)
    assert torch.allclose(opt.last_weights, w, atol=1e-6)
    assert torch.allclose(opt.last_losses, losses, atol=1e-6)


CONFIGS = [
    dict(t=1.0, noise="gaussian", sampler="ascent"),
    dict(t=0.0, noise="sphere", noise_scale=0.3, sampler="ascent"),
    dict(t=math.inf, noise="ball", noise_scale=0.3, sampler="ascent"),
    dict(t=20.0, noise="sphere", noise_scale=0.2, sampler="none", samples=5),
    dict(
        t=5.0,
        noise="ball",
        noise_scale=0.05,
        sampler="hmc",
        delta=2.0,
        hmc_steps=2,
        hmc_step_size=0.05,
        rho=0.1,
    ),
    dict(t=1.0, noise="none", sampler="hmc", hmc_steps=1, rho=0.2),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_step_on_batch_equals_step_with_closure(config, monkeypatch):
    x, y = _batch()
    (m_loop, m_vec), (o_loop, o_vec) = _pair(momentum=0.9, **config)
    calls = _count_vectorized_calls(monkeypatch)
    for _ in range(3):
        l_loop = o_loop.step(_closure(m_loop, x, y))
        l_vec = o_vec.step_on_batch(m_vec, LOSS, x, y)
        assert l_loop.item() == pytest.approx(l_vec.item(), rel=1e-5, abs=1e-6)
    assert not o_vec._vmap_failed
    assert calls == [1, 1, 1]
    _assert_same(_params(m_loop), _params(m_vec), atol=1e-5)


def _count_vectorized_calls(monkeypatch):
    """Record each call of the vectorized step (so a test knows which path ran)."""
    calls = []
    real = _vectorized.tilted_backward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_vectorized, "tilted_backward", spy)
    return calls


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_step_on_batch_on_cpu_runs_the_loop_and_matches_step_bit_for_bit(config, monkeypatch):
    """The per-device path choice: on CPU step_on_batch evaluates the samples one after another
    (the faster path there), drawing the same noise as step(closure)."""
    x, y = _batch()
    (m_loop, m_batch), (o_loop, o_batch) = _pair(momentum=0.9, vectorize_cpu=False, **config)
    calls = _count_vectorized_calls(monkeypatch)
    assert not o_batch.vectorizes(o_batch._params())
    for _ in range(3):
        l_loop = o_loop.step(_closure(m_loop, x, y))
        l_batch = o_batch.step_on_batch(m_batch, LOSS, x, y)
        assert torch.equal(l_loop, l_batch)
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(_params(m_loop), _params(m_batch), strict=True))


def test_path_choice_is_per_device():
    cpu = [torch.zeros(3)]
    meta = [torch.empty(3, device="meta")]  # any non-CPU device counts as an accelerator
    assert not TSAM(cpu, torch.optim.SGD, lr=0.1).vectorizes(cpu)
    assert TSAM(cpu, torch.optim.SGD, lr=0.1, vectorize_cpu=True).vectorizes(cpu)
    assert TSAM(meta, torch.optim.SGD, lr=0.1).vectorizes(meta)
    assert not TSAM(meta, torch.optim.SGD, lr=0.1, vectorize=False).vectorizes(meta)
    mixed = [*cpu, *meta]
    assert not TSAM(mixed, torch.optim.SGD, lr=0.1).vectorizes(mixed)


class _NotVmappable(nn.Module):
    """A model torch.func cannot vectorize: data-dependent Python control flow."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        out = self.net(x)
        return out * 2 if out.sum().item() > -1e9 else out


def test_unsupported_model_falls_back_to_the_loop_with_the_same_update():
    x, y = _batch()
    (m_loop, m_vec), (o_loop, o_vec) = _pair(_NotVmappable, t=2.0, noise="sphere", noise_scale=0.1)
    assert o_vec.vectorizes(o_vec._params())
    with pytest.warns(RuntimeWarning, match="falling back"):
        o_vec.step_on_batch(m_vec, LOSS, x, y)
    o_loop.step(_closure(m_loop, x, y))
    assert o_vec._vmap_failed
    assert not o_vec.vectorizes(o_vec._params())
    _assert_same(_params(m_loop), _params(m_vec), atol=1e-6)
    # Later steps go straight to the loop, still drawing what step(closure) draws.
    o_vec.step_on_batch(m_vec, LOSS, x, y)
    o_loop.step(_closure(m_loop, x, y))
    _assert_same(_params(m_loop), _params(m_vec), atol=1e-6)


@pytest.mark.parametrize("vectorize_cpu", [True, False])
def test_batchnorm_statistics_are_updated_once_per_step_at_the_unperturbed_weights(
    vectorize_cpu,
):
    x, y = _batch()
    model = _bn_net()
    reference = copy.deepcopy(model)
    opt = TSAM(
        model.parameters(),
        torch.optim.SGD,
        samples=3,
        lr=0.1,
        generator=torch.Generator().manual_seed(0),
        vectorize_cpu=vectorize_cpu,
    )
    opt.step_on_batch(model, LOSS, x, y)
    with torch.no_grad():
        reference(x)  # one train-mode forward at theta
    bn, ref_bn = model[1], reference[1]
    assert torch.allclose(bn.running_mean, ref_bn.running_mean)
    assert torch.allclose(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.track_running_stats


@pytest.mark.parametrize("vectorize_cpu", [True, False])
def test_batchnorm_model_gets_the_same_update_on_both_paths(vectorize_cpu):
    x, y = _batch()
    (m_loop, m_vec), (o_loop, o_vec) = _pair(_bn_net, t=3.0, samples=3, vectorize_cpu=vectorize_cpu)
    o_loop.step(_closure(m_loop, x, y))
    o_vec.step_on_batch(m_vec, LOSS, x, y)
    assert not o_vec._vmap_failed
    _assert_same(_params(m_loop), _params(m_vec), atol=1e-5)


def test_sphere_noise_update_matches_monte_carlo_gradient_of_tilted_objective():
    """On L(theta) = 0.5 theta^T A theta with eps uniform on a sphere, one TSAM step with many
    samples moves theta by -lr * grad L_t, where grad L_t is estimated independently by central
    finite differences of a Monte-Carlo estimate of (1/t) log E exp(t L(theta + eps))."""
    torch.manual_seed(0)
    a = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 2.0]], dtype=torch.float64)
    theta0 = torch.tensor([0.4, -0.3, 0.6], dtype=torch.float64)
    t, r, s = 2.0, 0.5, 20000
    theta = nn.Parameter(theta0.clone())
    opt = TSAM(
        [theta],
        torch.optim.SGD,
        t=t,
        samples=s,
        noise="sphere",
        noise_scale=r,
        sampler="none",
        lr=1.0,
        generator=torch.Generator().manual_seed(1),
    )

    def closure():
        loss = 0.5 * theta @ a @ theta
        loss.backward()
        return loss

    opt.step(closure)
    tsam_grad = theta0 - theta.detach()

    gen = torch.Generator().manual_seed(2)
    z = torch.randn(400000, 3, generator=gen, dtype=torch.float64)
    eps = r * z / z.norm(dim=1, keepdim=True)

    def objective(th):
        pts = th + eps
        losses = 0.5 * ((pts @ a) * pts).sum(1)
        return (torch.logsumexp(t * losses, 0) - math.log(len(losses))) / t

    h = 1e-4
    fd = torch.stack(
        [
            (objective(theta0 + h * e) - objective(theta0 - h * e)) / (2 * h)
            for e in torch.eye(3, dtype=torch.float64)
        ]
    )
    assert torch.allclose(tsam_grad, fd, atol=0.02), (tsam_grad, fd)
    # ... and it is not the plain gradient at theta: the tilt matters here.
    assert not torch.allclose(tsam_grad, a @ theta0, atol=0.02)


def test_state_dict_round_trip_continues_in_lockstep():
    x, y = _batch()
    model = _mlp()
    opt = TSAM(
        model.parameters(),
        torch.optim.SGD,
        t=2.0,
        lr=0.1,
        momentum=0.9,
        t_schedule="ramp_up",
        total_steps=10,
        generator=torch.Generator().manual_seed(0),
    )
    for _ in range(3):
        opt.step_on_batch(model, LOSS, x, y)
    state = copy.deepcopy(opt.state_dict())
    assert state["state"], "momentum buffers must be in the state dict"
    twin = copy.deepcopy(model)
    opt2 = TSAM(
        twin.parameters(),
        torch.optim.SGD,
        t=2.0,
        lr=0.5,
        momentum=0.9,
        t_schedule="ramp_up",
        total_steps=10,
        generator=torch.Generator(),
    )
    opt2.load_state_dict(state)
    opt2.generator.set_state(opt.generator.get_state())
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.steps_taken == 3
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    for _ in range(3):
        opt.step_on_batch(model, LOSS, x, y)
        opt2.step_on_batch(twin, LOSS, x, y)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(twin), strict=True))


def test_lr_scheduler_on_the_wrapper_drives_the_base_optimizer():
    model = _mlp()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batch()
    opt.step_on_batch(model, LOSS, x, y)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_t_schedule_ramps_between_zero_and_t():
    x, y = _batch()
    model = _mlp()
    up = TSAM(
        model.parameters(), torch.optim.SGD, t=10.0, t_schedule="ramp_up", total_steps=4, lr=0.01
    )
    seen = []
    for _ in range(5):
        seen.append(up.current_t)
        up.step_on_batch(model, LOSS, x, y)
    assert seen == [0.0, 2.5, 5.0, 7.5, 10.0]
    down = TSAM(
        model.parameters(), torch.optim.SGD, t=10.0, t_schedule="ramp_down", total_steps=4, lr=0.01
    )
    assert down.current_t == 10.0


def test_diagnostics_are_readable_after_a_step():
    x, y = _batch()
    model = _mlp()
    opt = TSAM(model.parameters(), torch.optim.SGD, t=0.0, samples=4, lr=0.1)
    loss = opt.step_on_batch(model, LOSS, x, y)
    assert opt.last_tilted_loss is loss
    assert opt.last_entropy.item() == pytest.approx(math.log(4))
    assert loss.item() == pytest.approx(opt.last_losses.mean().item())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"t": -1.0}, "t"),
        ({"t": float("nan")}, "t"),
        ({"rho": -0.1}, "rho"),
        ({"rho": math.inf}, "rho"),
        ({"samples": 0}, "samples"),
        ({"samples": 2.5}, "samples"),
        ({"noise": "uniform"}, "noise"),
        ({"noise_scale": -1.0}, "noise_scale"),
        ({"noise_radius": -1.0}, "noise_radius"),
        ({"sampler": "langevin"}, "sampler"),
        ({"sampler": "hmc", "hmc_steps": 0}, "hmc_steps"),
        ({"sampler": "hmc", "hmc_step_size": -1.0}, "hmc_step_size"),
        ({"sampler": "hmc", "momentum_std": -1.0}, "momentum_std"),
        ({"delta": 1.0}, "delta"),
        ({"t_schedule": "cosine"}, "t_schedule"),
        ({"t_schedule": "ramp_up"}, "total_steps"),
        ({"t_schedule": "ramp_up", "total_steps": 5, "t": math.inf}, "t_schedule"),
        ({"generator": 3}, "generator"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_base_optimizer_must_be_an_optimizer_class():
    with pytest.raises(ValueError, match="base_optimizer"):
        TSAM(_mlp().parameters(), torch.optim.SGD(_mlp().parameters(), lr=0.1))


def test_step_without_closure_raises():
    opt = TSAM(_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_loop_path_works_with_adamw_and_unused_parameters():
    model = _mlp()
    unused = nn.Parameter(torch.ones(3))
    opt = TSAM([*model.parameters(), unused], torch.optim.AdamW, lr=0.01, samples=2)
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(_closure(model, x, y))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("exponent", [0.0, 0.7, 25.0, -3.0, math.inf])
def test_streamed_weights_fold_gradients_into_the_tilted_mean(exponent):
    """Folding samples one at a time with lerp(mean, g, weight) gives sum_j softmax(a)_j g_j."""
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(7, generator=gen) * 3
    losses[4] = losses[1] = losses.max() + 1  # a tie for the worst: the first one wins
    grads = torch.randn(7, 5, generator=gen)
    mean = grads[0].clone()
    best = losses[0] if math.isinf(exponent) else losses[0] * exponent
    norm_z = torch.ones(())
    for j in range(1, 7):
        weight, best, norm_z = streamed_weight(losses[j], best, norm_z, exponent)
        mean.lerp_(grads[j], weight)
    expected = tilted_weights(losses, exponent) @ grads
    assert torch.allclose(mean, expected, atol=1e-6)
    if math.isinf(exponent):
        assert torch.equal(mean, grads[1])


def _buffers(opt):
    block = opt._loop_block
    return [t.data_ptr() for t in (block.noise, block.momentum) if t is not None] + [
        b.data_ptr() for b in opt._snapshot_buffers
    ]


@pytest.mark.parametrize("sampler", ["ascent", "hmc"])
def test_loop_reuses_its_buffers_across_steps(sampler):
    x, y = _batch()
    model = _mlp()
    opt = TSAM(
        model.parameters(),
        torch.optim.SGD,
        samples=3,
        sampler=sampler,
        lr=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    opt.step_on_batch(model, LOSS, x, y)
    first = _buffers(opt)
    assert len(first) == (1 if sampler == "ascent" else 2) + 4  # noise (+ momentum), 4 params
    opt.step(_closure(model, x, y))
    opt.step_on_batch(model, LOSS, x, y)
    assert _buffers(opt) == first


def test_buffers_follow_new_param_groups_and_dtypes():
    """After the parameters change shape (a new group) or dtype, the loop reallocates its
    buffers and gives exactly the update of an optimizer built for the new parameters."""
    x, y = _batch()
    model, twin = _mlp(), _mlp()
    extra, extra_twin = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    kw = dict(t=2.0, samples=3, lr=0.1, momentum=0.9)
    opt = TSAM(
        model.parameters(), torch.optim.SGD, generator=torch.Generator().manual_seed(0), **kw
    )
    opt.step(_closure(model, x, y))
    before = _buffers(opt)

    def closure_with(m, p):
        def closure():
            loss = LOSS(m(x), y) + (p**2).sum()
            loss.backward()
            return loss

        return closure

    opt.add_param_group({"params": [extra]})
    with torch.no_grad():
        for a, b in zip(twin.parameters(), model.parameters(), strict=True):
            a.copy_(b)
    twin_opt = TSAM(
        [*twin.parameters(), extra_twin], torch.optim.SGD, generator=torch.Generator(), **kw
    )
    twin_opt.generator.set_state(opt.generator.get_state())
    opt.step(closure_with(model, extra))
    twin_opt.step(closure_with(twin, extra_twin))
    assert _buffers(opt) != before
    # Same draws, same weights: the new parameter (no momentum history in either) moves alike.
    assert torch.equal(extra, extra_twin)
    model.double()
    x64 = x.double()
    assert opt._loop_block.layout.dtype == torch.float32
    opt.step(_closure(model, x64, y))
    # The model is float64 now, `extra` still float32: draws in float64, each cast on the way.
    assert opt._loop_block.layout.dtype == torch.float64
    assert [b.dtype for b in opt._snapshot_buffers] == [p.dtype for p in opt._params()]
    assert [p.dtype for p in opt._params()][-2:] == [torch.float64, torch.float32]
    assert all(torch.isfinite(p).all() for p in opt._params())


def test_batchnorm_pass_of_a_sequential_stops_after_its_last_batchnorm():
    x, _ = _batch()
    model = _bn_net()
    reference = copy.deepcopy(model)
    calls = []
    model[3].register_forward_hook(lambda *_: calls.append(1))
    update_batchnorm_stats(model, x)
    assert calls == []  # the classifier after the BatchNorm did not run
    with torch.no_grad():
        reference(x)
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)
    model.eval()
    update_batchnorm_stats(model, x)  # eval mode: no pass at all
    assert model[1].num_batches_tracked.item() == 1
