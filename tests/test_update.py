"""The shared update: formula, weight-decay rule, stochastic rounding; and lr schedules."""

import pytest
import torch

from distzo.directions import direction_like
from distzo.schedules import Schedule
from distzo.records import zo_sgd
from distzo.update import apply_update_, stochastic_round


def test_update_formula_fp32_with_decay_and_directions():
    w = torch.randn(6, 5)
    b = torch.randn(5)
    seeds, grads, lr, wd = [11, 12], [0.5, -2.0], 1e-2, 0.1
    zw = [direction_like(w, s, 7) for s in seeds]
    zb = [direction_like(b, s, 8) for s in seeds]
    exp_w = w - lr * ((grads[0] * zw[0] + grads[1] * zw[1]) / 2 + wd * w)
    exp_b = b - lr * ((grads[0] * zb[0] + grads[1] * zb[1]) / 2)  # no decay on 1-D tensors
    apply_update_(w, 7, zo_sgd(0, seeds, grads, lr, wd))
    apply_update_(b, 8, zo_sgd(0, seeds, grads, lr, wd))
    torch.testing.assert_close(w, exp_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, exp_b, rtol=0, atol=1e-6)


def test_cached_directions_give_identical_update():
    a = torch.randn(64, 3)
    b = a.clone()
    apply_update_(a, 5, zo_sgd(0, [99], [0.3], 1e-3, 0.0))
    apply_update_(b, 5, zo_sgd(0, [99], [0.3], 1e-3, 0.0), cached=[direction_like(b, 99, 5)])
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    n = 1 << 18
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # spacing just above 1.0
    exact = 1.0 + 0.2 * ulp * torch.randn(n, generator=torch.Generator().manual_seed(0))
    rounded = stochastic_round(exact, dtype, seed=3, key=4).float()
    # each element lands on one of its two neighbours: error < 1 ulp, variance <= ulp^2 / 4
    assert float((rounded - exact).abs().max()) <= ulp
    bias = float((rounded - exact).mean())
    assert abs(bias) < 5 * (ulp / 2) / n**0.5
    # round-to-nearest is biased here: it sends most of these values back to 1.0
    nearest = exact.to(dtype).float()
    assert float((nearest == 1.0).float().mean()) > 0.6 and float((rounded == 1.0).float().mean()) < 0.95


def test_tiny_bf16_updates_track_fp32_in_mean():
    # lr * g * z ~ 1e-4 is far below half a bf16 ulp at 1.0 (3.9e-3): rounding to nearest
    # would leave the weights unchanged forever; stochastic rounding follows fp32 in the mean.
    n, steps = 1 << 16, 40
    w16 = torch.ones(n, dtype=torch.bfloat16)
    w32 = torch.ones(n)
    for t in range(steps):
        apply_update_(w16, 1, zo_sgd(t, [1000 + t], [0.1], 1e-3, 0.0))
        apply_update_(w32, 1, zo_sgd(t, [1000 + t], [0.1], 1e-3, 0.0))
    drift = (w32 - 1.0).abs().mean()
    assert float(drift) > 2e-4  # the fp32 weights did move
    gap = float((w16.float() - w32).mean())
    # per element, after `steps` unbiased roundings: sd <= ulp/2 * sqrt(steps); mean over n
    bound = 5 * (2.0**-7 / 2) * steps**0.5 / n**0.5
    assert abs(gap) < bound, (gap, bound)


def test_stochastic_rounding_is_deterministic():
    x = torch.randn(1000)
    assert torch.equal(stochastic_round(x, torch.bfloat16, 1, 2), stochastic_round(x, torch.bfloat16, 1, 2))
    assert not torch.equal(stochastic_round(x, torch.bfloat16, 1, 2), stochastic_round(x, torch.bfloat16, 9, 2))


def test_schedules():
    assert Schedule().factor(10**6) == 1.0
    warm = Schedule("constant", warmup_steps=4)
    assert [warm.factor(t) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = Schedule("linear", total_steps=10)
    assert lin.factor(0) == 1.0 and lin.factor(5) == 0.5 and lin.factor(10) == 0.0 and lin.factor(20) == 0.0
    cos = Schedule("cosine", warmup_steps=2, total_steps=12, min_ratio=0.1)
    assert cos.factor(2) == pytest.approx(1.0) and cos.factor(7) == pytest.approx(0.55) and cos.factor(12) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs", [{"name": "step"}, {"name": "linear"}, {"warmup_steps": -1}, {"min_ratio": 2.0}])
def test_bad_schedules(kwargs):
    with pytest.raises(ValueError):
        Schedule(**kwargs)
