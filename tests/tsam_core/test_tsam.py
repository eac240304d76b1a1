"""TSAM against its definition, its limits (SAM, the base optimizer) and its two code paths."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from tsam_core import SAM, TSAM
from tsam_core.perturb import draw_noise

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
    """Two identical models with TSAM optimizers seeded identically."""
    models, opts = [], []
    for _ in range(2):
        m = factory()
        kw2 = dict(kw)
        kw2.setdefault("lr", 0.1)
        opts.append(
            TSAM(m.parameters(), torch.optim.SGD, generator=torch.Generator().manual_seed(7), **kw2)
        )
        models.append(m)
    return models, opts


@pytest.mark.parametrize("path", ["closure", "batch"])
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
    )
    sam = SAM(m_s.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(5):
        if path == "closure":
            tsam.step(_closure(m_t, x, y))
            sam.step(_closure(m_s, x, y))
        else:
            tsam.step_on_batch(m_t, LOSS, x, y)
            sam.step_on_batch(m_s, LOSS, x, y)
    _assert_same(_params(m_t), _params(m_s), atol=1e-6)
    if path == "closure":
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
def test_step_on_batch_equals_step_with_closure(config):
    x, y = _batch()
    (m_loop, m_vec), (o_loop, o_vec) = _pair(momentum=0.9, **config)
    for _ in range(3):
        l_loop = o_loop.step(_closure(m_loop, x, y))
        l_vec = o_vec.step_on_batch(m_vec, LOSS, x, y)
        assert l_loop.item() == pytest.approx(l_vec.item(), rel=1e-5, abs=1e-6)
    assert not o_vec._vmap_failed
    _assert_same(_params(m_loop), _params(m_vec), atol=1e-5)


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
    with pytest.warns(RuntimeWarning, match="falling back"):
        o_vec.step_on_batch(m_vec, LOSS, x, y)
    o_loop.step(_closure(m_loop, x, y))
    assert o_vec._vmap_failed
    _assert_same(_params(m_loop), _params(m_vec), atol=1e-6)


def test_batchnorm_statistics_are_updated_once_per_step_at_the_unperturbed_weights():
    x, y = _batch()
    model = _bn_net()
    reference = copy.deepcopy(model)
    opt = TSAM(
        model.parameters(),
        torch.optim.SGD,
        samples=3,
        lr=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    opt.step_on_batch(model, LOSS, x, y)
    with torch.no_grad():
        reference(x)  # one train-mode forward at theta
    bn, ref_bn = model[1], reference[1]
    assert torch.allclose(bn.running_mean, ref_bn.running_mean)
    assert torch.allclose(bn.running_var, ref_bn.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.track_running_stats


def test_batchnorm_model_gets_the_same_update_on_both_paths():
    x, y = _batch()
    (m_loop, m_vec), (o_loop, o_vec) = _pair(_bn_net, t=3.0, samples=3)
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
