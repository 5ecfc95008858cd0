import math

import pytest
import torch

from svlib.pruning.hardconcrete import HardConcrete

torch.set_num_threads(2)


def _gate(n=64, seed=0, spread=3.0):
    torch.manual_seed(seed)
    gate = HardConcrete(n, init_keep_prob=0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-spread, spread, n))
    return gate


def test_init_from_keep_probability():
    torch.manual_seed(0)
    gate = HardConcrete(10_000, init_keep_prob=0.99, init_std=0.01)
    assert gate.log_alpha.mean().item() == pytest.approx(math.log(0.99 / 0.01), abs=1e-3)
    assert gate.log_alpha.std().item() == pytest.approx(0.01, rel=0.05)
    # keep 0.99 in log_alpha -> P(z != 0) is higher still because of the stretch
    assert gate.keep_probs()[0].item() > 0.99
    with pytest.raises(ValueError):
        HardConcrete(4, init_keep_prob=1.0)
    with pytest.raises(ValueError):
        HardConcrete(4, stretch=(0.0, 1.1))


def test_l0_norm_matches_monte_carlo():
    gate = _gate()
    gate.train()
    torch.manual_seed(1)
    samples = torch.stack([gate() for _ in range(8000)])
    assert samples.min().item() == 0.0 and samples.max().item() == 1.0
    nonzero = (samples > 0).float().mean(0)
    # per gate: Bernoulli frequency over 8000 draws, 5 sigma < 0.028
    assert torch.allclose(nonzero, gate.keep_probs().detach(), atol=0.028)
    expected = gate.l0_norm().item()
    assert (samples > 0).float().sum(1).mean().item() == pytest.approx(expected, rel=0.01)
    # P(z == 1) = sigmoid(log_alpha - beta * log((1 - l) / (r - 1))) is the other end of the stretch
    p_one = torch.sigmoid(gate.log_alpha - gate.beta * math.log((1 - gate.low) / (gate.high - 1))).detach()
    assert torch.allclose((samples == 1).float().mean(0), p_one, atol=0.028)


def test_eval_mask_keeps_round_expected_l0():
    for seed in range(5):
        torch.manual_seed(seed)
        gate = HardConcrete(37, init_keep_prob=0.5)
        with torch.no_grad():
            gate.log_alpha.normal_(0.0, 2.0)
        gate.eval()
        mask = gate()
        keep = round(gate.l0_norm().item())
        assert int((mask != 0).sum()) == keep
        kept = torch.nonzero(mask).flatten()
        top = torch.topk(gate.log_alpha.detach(), keep).indices
        assert set(kept.tolist()) == set(top.tolist())
        soft = torch.sigmoid(gate.log_alpha.detach() * 0.8 / gate.beta)
        assert torch.allclose(mask[kept], soft[kept])
        assert torch.equal(mask, gate())  # deterministic


def test_extreme_gates():
    gate = HardConcrete(6)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([1e4, 1e4, -1e4, -1e4, -1e4, 1e4]))
    assert gate.l0_norm().item() == 3.0
    gate.eval()
    assert (gate() != 0).tolist() == [True, True, False, False, False, True]
    gate.train()
    assert gate().tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_gradients_reach_log_alpha():
    gate = _gate(n=16, spread=1.0)
    gate.train()
    torch.manual_seed(3)
    gate().sum().backward()
    grad = gate.log_alpha.grad
    assert grad is not None and (grad > 0).sum() >= 8  # a larger log_alpha gives a larger mask value
    assert (grad >= 0).all()
    gate.log_alpha.grad = None
    gate.l0_norm().backward()
    p = gate.keep_probs().detach()
    assert torch.allclose(gate.log_alpha.grad, p * (1 - p))


def test_fresh_sample_per_forward():
    gate = _gate(n=32, spread=0.5)
    gate.train()
    a, b = gate(), gate()
    assert not torch.equal(a, b)
