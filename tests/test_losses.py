"""AAM-softmax, margin schedule and the speed-perturbation class-row rule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from svlib.losses import AAMSoftmax, MarginSchedule, keep_classes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention on a shared machine
    yield
    torch.set_num_threads(before)


def _batch(n=16, dim=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_zero_margin_is_scaled_cosine_cross_entropy():
    emb, labels = _batch()
    head = AAMSoftmax(8, 5, scale=30.0, margin=0.0)
    loss, acc = head(emb, labels)
    cosine = F.normalize(emb) @ F.normalize(head.weight).T
    assert loss.item() == pytest.approx(F.cross_entropy(30.0 * cosine, labels).item(), rel=1e-6)
    assert acc.item() == pytest.approx((cosine.argmax(1) == labels).float().mean().item())


def test_target_logit_is_cos_theta_plus_m():
    # one embedding at a known angle to its class: loss = -log softmax with s*cos(theta+m) on the target
    head = AAMSoftmax(2, 2, scale=10.0, margin=0.3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = 0.5
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]])
    loss, acc = head(emb, torch.tensor([0]))
    target, other = 10 * math.cos(theta + 0.3), 10 * math.cos(math.pi / 2 - theta)
    expected = -target + math.log(math.exp(target) + math.exp(other))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert acc.item() == 1.0


def test_fallback_when_theta_plus_m_exceeds_pi():
    head = AAMSoftmax(2, 2, scale=1.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = 3.0  # theta + m = 3.5 > pi: cos(theta + m) would *increase* with theta here
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]])
    loss, _ = head(emb, torch.tensor([0]))
    target = math.cos(theta) - 0.5 * math.sin(0.5)
    other = math.cos(theta - math.pi / 2)
    expected = -target + math.log(math.exp(target) + math.exp(other))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    easy = AAMSoftmax(2, 2, scale=1.0, margin=0.5, easy_margin=True)
    easy.weight.data.copy_(head.weight.data)
    # easy margin leaves negative-cosine targets unpenalised: equal to the plain softmax there
    plain = -math.cos(theta) + math.log(math.exp(math.cos(theta)) + math.exp(other))
    assert easy(emb, torch.tensor([0]))[0].item() == pytest.approx(plain, rel=1e-5)


def test_target_logit_decreases_monotonically_in_the_angle():
    # The other class is orthogonal to the plane the embedding turns in, so the loss only moves with the
    # target logit: it must grow with theta over the whole range, across the theta + m = pi switch.
    head = AAMSoftmax(3, 2, scale=4.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    thetas = torch.linspace(0.05, math.pi - 0.01, 200)
    emb = torch.stack([thetas.cos(), thetas.sin(), torch.zeros_like(thetas)], dim=1)
    losses = torch.stack([head(e[None], torch.tensor([0]))[0] for e in emb])
    assert (losses.diff() > 0).all()


def test_margin_increases_loss_and_is_settable():
    emb, labels = _batch(seed=1)
    head = AAMSoftmax(8, 5, scale=32.0, margin=0.0)
    values = []
    for m in (0.0, 0.1, 0.2, 0.3):
        head.margin = m
        values.append(head(emb, labels)[0].item())
    assert values == sorted(values) and values[-1] > values[0] + 1.0
    assert head.margin == 0.3
    # accuracy ignores the margin
    acc_with_margin = head(emb, labels)[1].item()
    head.margin = 0.0
    assert head(emb, labels)[1].item() == acc_with_margin


def test_loss_decreases_on_separable_problem():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 16), dim=1) * 3
    labels = torch.arange(4).repeat_interleave(16)
    emb = centres[labels] + 0.3 * torch.randn(64, 16)
    proj = torch.nn.Linear(16, 16)
    head = AAMSoftmax(16, 4, scale=16.0, margin=0.2)
    opt = torch.optim.SGD(list(proj.parameters()) + list(head.parameters()), lr=0.1)
    first = None
    for _ in range(60):
        loss, acc = head(proj(emb), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert acc.item() == 1.0


def test_gradients_finite_at_exact_class_direction():
    head = AAMSoftmax(3, 3, scale=32.0, margin=0.0)
    emb = head.weight.detach()[:2].clone().requires_grad_(True)  # cos = 1 exactly for the target
    loss, _ = head(emb, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_margin_schedule():
    lin = MarginSchedule(final_margin=0.2, start_step=10, end_step=30, kind="linear")
    assert [lin(s) for s in (0, 9, 10, 20, 29, 30, 10**6)] == pytest.approx([0, 0, 0, 0.1, 0.19, 0.2, 0.2])
    exp = MarginSchedule(final_margin=0.2, start_step=10, end_step=30, kind="exp")
    # WeSpeaker's exp ramp: 1 - 1e-3 ** t -> half-way in time is ~97 % of the margin
    assert exp(20) == pytest.approx(0.2 * (1 - 1e-3 ** 0.5), rel=1e-5)
    assert exp(10) == 0.0 and exp(30) == 0.2
    ramp = [exp(s) for s in range(10, 31)]
    assert ramp == sorted(ramp)
    assert MarginSchedule(final_margin=0.3)(0) == 0.3  # no warm-up
    assert MarginSchedule(0.2, 0, 10, initial_margin=0.1, kind="linear")(5) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        MarginSchedule(0.2, start_step=10, end_step=5)


def test_keep_classes_keeps_original_speed_rows():
    n, dim = 4, 3
    w = torch.arange(3 * n * dim, dtype=torch.float32).reshape(3 * n, dim)
    kept = keep_classes(w, n)
    assert kept.shape == (n, dim)
    assert torch.equal(kept, w[:n])
    kept[0, 0] = -1.0
    assert w[0, 0] == 0.0  # a copy: the old head is not modified through it
    assert torch.equal(keep_classes(w[:n], n), w[:n])
    with pytest.raises(ValueError, match="not a multiple"):
        keep_classes(w, 5)
    # loading the kept rows into a stage-3 head gives the same logits for the original speakers
    old = AAMSoftmax(dim, 3 * n, margin=0.0)
    new = AAMSoftmax(dim, n, margin=0.0)
    new.load_state_dict({"weight": keep_classes(old.weight, n)})
    emb = torch.randn(5, dim)
    labels = torch.tensor([0, 1, 2, 3, 0])
    cos_old = F.normalize(emb) @ F.normalize(old.weight[:n]).T
    assert new(emb, labels)[0].item() == pytest.approx(F.cross_entropy(32 * cos_old, labels).item(), rel=1e-5)
