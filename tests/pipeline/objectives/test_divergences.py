"""Divergences against explicit per-token python loops on tiny tensors."""

import math

import pytest
import torch

from dskd_pipe.pipeline.objectives.divergences import (
    DIVERGENCES,
    adaptive_kl,
    cross_entropy_sum,
    get_divergence,
)


def _softmax(row, tau):
    m = max(row)
    e = [math.exp((z - m) / tau) for z in row]
    s = sum(e)
    return [v / s for v in e]


def _naive_row(name, zs, zt, tau):
    """One position, written from spec/dskd.md with plain python floats."""
    p, q = _softmax(zt, tau), _softmax(zs, tau)
    a = 0.1
    if name == "fkl":
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    if name == "rkl":
        return sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))
    if name == "sfkl":
        return sum(pi * (math.log(pi) - math.log(a * pi + (1 - a) * qi)) for pi, qi in zip(p, q))
    if name == "srkl":
        return sum(qi * (math.log(qi) - math.log((1 - a) * pi + a * qi)) for pi, qi in zip(p, q))
    if name == "js":
        m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
        return 0.5 * (
            sum(pi * (math.log(pi) - math.log(mi)) for pi, mi in zip(p, m))
            + sum(qi * (math.log(qi) - math.log(mi)) for qi, mi in zip(q, m))
        )
    if name == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    if name == "akl":
        order = sorted(range(len(p)), key=lambda v: p[v])  # ascending teacher probability
        cum, g_head, g_tail = 0.0, 0.0, 0.0
        for v in order:
            cum += p[v]
            if cum < 0.5:
                g_tail += abs(p[v] - q[v])
            else:
                g_head += abs(p[v] - q[v])
        fkl = _naive_row("fkl", zs, zt, tau)
        rkl = _naive_row("rkl", zs, zt, tau)
        return g_head / (g_head + g_tail) * fkl + g_tail / (g_head + g_tail) * rkl
    raise KeyError(name)


@pytest.fixture
def tiny():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([True, False, True, True, False])
    return zs, zt, mask


def test_registry_names():
    assert set(DIVERGENCES) == {"fkl", "rkl", "sfkl", "srkl", "js", "akl", "tvd"}


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_matches_naive_loop_with_mask_and_tau(tiny, name, tau):
    zs, zt, mask = tiny
    got = DIVERGENCES[name](zs, zt, mask, tau=tau)
    want = sum(_naive_row(name, zs[i].tolist(), zt[i].tolist(), tau) for i in range(5) if mask[i])
    assert got.dtype == torch.float32  # fp32 math whatever the input dtype
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_masked_rows_are_ignored_even_if_nan(tiny, name):
    zs, zt, mask = tiny
    zs_bad, zt_bad = zs.clone(), zt.clone()
    zs_bad[~mask] = float("nan")
    zt_bad[~mask] = float("nan")
    assert DIVERGENCES[name](zs_bad, zt_bad, mask).item() == pytest.approx(DIVERGENCES[name](zs, zt, mask).item())


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_zero_when_equal_and_empty_mask(tiny, name):
    zs, _, mask = tiny
    assert DIVERGENCES[name](zs, zs.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert DIVERGENCES[name](zs, zs + 1.0, torch.zeros(5, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_accepts_batched_shapes_and_grad_reaches_student_only(name):
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    zt = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    flat = DIVERGENCES[name](zs.reshape(6, 6), zt.reshape(6, 6), mask.reshape(6))
    batched = DIVERGENCES[name](zs, zt.detach(), mask)
    assert batched.item() == pytest.approx(flat.item(), rel=1e-6)
    batched.backward()
    assert zs.grad.abs().sum() > 0
    assert zs.grad[~mask].abs().sum() == 0


def test_akl_weights_are_constants():
    """AKL's gradient is the weighted FKL/RKL gradients with the weights held fixed."""
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(1, 6, generator=g, requires_grad=True)
    zt = torch.randn(1, 6, generator=g)
    mask = torch.ones(1, dtype=torch.bool)
    adaptive_kl(zs, zt, mask).backward()
    # Weighted combination of autograd gradients with weights from the naive loop.
    p = torch.softmax(zt / 2, -1)[0].tolist()
    q = torch.softmax(zs.detach() / 2, -1)[0].tolist()
    order = sorted(range(6), key=lambda v: p[v])
    cum, gh, gt = 0.0, 0.0, 0.0
    for v in order:
        cum += p[v]
        if cum < 0.5:
            gt += abs(p[v] - q[v])
        else:
            gh += abs(p[v] - q[v])
    zs2 = zs.detach().clone().requires_grad_(True)
    (gh / (gh + gt) * DIVERGENCES["fkl"](zs2, zt, mask) + gt / (gh + gt) * DIVERGENCES["rkl"](zs2, zt, mask)).backward()
    torch.testing.assert_close(zs.grad, zs2.grad)


def test_cross_entropy_sum_ignores_minus_100():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, -100, 2])
    want = -math.log(_softmax([2.0, 0.0, -1.0], 1.0)[0]) - math.log(_softmax([1.0, 2.0, 3.0], 1.0)[2])
    got = cross_entropy_sum(logits, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert cross_entropy_sum(logits, torch.full((3,), -100)).item() == 0.0


def test_unknown_divergence_names_the_choices():
    with pytest.raises(ValueError, match="unknown divergence 'kl'; expected one of: akl, fkl, js, rkl, sfkl, srkl, tvd"):
        get_divergence("kl")


def test_the_declared_divergence_names_are_the_implemented_ones():
    from dskd_pipe.pipeline.config import DIVERGENCE_NAMES

    assert tuple(DIVERGENCES) == DIVERGENCE_NAMES
