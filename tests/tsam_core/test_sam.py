import copy

import pytest
import torch
from torch import nn

from tsam_core import SAM

torch.set_num_threads(1)
LOSS = nn.CrossEntropyLoss()


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_step_matches_the_two_step_reference_formula():
    model, x, y = _setup()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)

    def closure():
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    params = list(ref.parameters())
    grads = torch.autograd.grad(LOSS(ref(x), y), params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(0.2 * g / (norm + 1e-12))
    grads2 = torch.autograd.grad(LOSS(ref(x), y), params)
    for p, p0, g in zip(model.parameters(), _setup()[0].parameters(), grads2, strict=True):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6)
    assert loss.item() == pytest.approx(LOSS(_setup()[0](x), y).item())


def test_step_on_batch_equals_step_with_closure():
    m1, x, y = _setup()
    m2 = copy.deepcopy(m1)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, adaptive=True, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, adaptive=True, lr=0.1, momentum=0.9)

    def closure():
        loss = LOSS(m1(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        o1.step(closure)
        o2.step_on_batch(m2, LOSS, x, y)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_keeps_momentum_and_relinks_groups():
    model, x, y = _setup()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.step_on_batch(model, LOSS, x, y)
    state = opt.state_dict()
    assert any("momentum_buffer" in s for s in state["state"].values())
    opt2 = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.3, momentum=0.9)
    opt2.load_state_dict(state)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"rho": -1.0}, "rho"), ({"adaptive": "yes"}, "adaptive")]
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SAM(_setup()[0].parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_adaptive_step_matches_the_asam_formula_and_skips_parameters_without_gradient():
    model, x, y = _setup()
    unused = nn.Parameter(torch.ones(2))
    ref = copy.deepcopy(model)
    opt = SAM([*model.parameters(), unused], torch.optim.SGD, rho=0.3, adaptive=True, lr=0.1)

    def closure():
        loss = LOSS(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    params = list(ref.parameters())
    grads = torch.autograd.grad(LOSS(ref(x), y), params)
    norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads, strict=True)))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(0.3 * p**2 * g / (norm + 1e-12))
    grads2 = torch.autograd.grad(LOSS(ref(x), y), params)
    for p, p0, g in zip(model.parameters(), _setup()[0].parameters(), grads2, strict=True):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6)
    assert torch.equal(unused, torch.ones(2))


def test_first_and_second_step_return_exactly_to_theta_with_reused_buffers():
    model, x, y = _setup()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    buffers = None
    for _ in range(3):
        theta = [p.detach().clone() for p in model.parameters()]
        LOSS(model(x), y).backward()
        opt.first_step(zero_grad=True)
        assert not any(torch.equal(p, t) for p, t in zip(model.parameters(), theta, strict=True))
        LOSS(model(x), y).backward()
        opt.second_step(zero_grad=True)
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta, strict=True))
        ptrs = [b.data_ptr() for b in opt._snapshot_buffers]
        assert buffers is None or ptrs == buffers
        buffers = ptrs
    assert not any("old_p" in s for s in opt.state_dict()["state"].values())
