"""The chunked selective scan against the step-by-step definition, and its memory bound."""

from __future__ import annotations

import pytest
import torch

from raysc.models.mamba import BiMamba, Mamba, selective_scan, selective_scan_reference


def _inputs(b=2, length=75, d=6, n=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, length, d, generator=g, dtype=dtype),
        torch.nn.functional.softplus(torch.randn(b, length, d, generator=g, dtype=dtype)),
        -torch.exp(torch.randn(d, n, generator=g, dtype=dtype)),
        torch.randn(b, length, n, generator=g, dtype=dtype),
        torch.randn(b, length, n, generator=g, dtype=dtype),
        torch.randn(d, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("method", ["parallel", "sequential"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 75, 128])
def test_chunked_scan_equals_sequential_definition(method, chunk):
    args = _inputs()
    ref = selective_scan_reference(*args)
    out = selective_scan(*args, chunk=chunk, method=method)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_chunked_scan_gradients_equal_the_definition(method):
    args = [t.double().requires_grad_() for t in _inputs(length=40)]
    grads = torch.autograd.grad(selective_scan(*args, chunk=16, method=method).pow(2).sum(), args)
    ref = torch.autograd.grad(selective_scan_reference(*args).pow(2).sum(), args)
    for g, r in zip(grads, ref, strict=True):
        assert (g - r).abs().max() < 1e-8


def test_large_decays_do_not_overflow():
    u, delta, A, B, C, D = _inputs(length=64)
    out = selective_scan(u, delta * 50, A * 10, B, C, D, chunk=32, method="parallel")
    assert torch.isfinite(out).all()
    assert (out - selective_scan_reference(u, delta * 50, A * 10, B, C, D)).abs().max() < 1e-4


def _saved_bytes(fn, length: int) -> int:
    """Bytes autograd keeps for backward when ``fn`` runs on inputs of this length."""
    args = [t.requires_grad_() for t in _inputs(b=2, length=length, d=16, n=8)]
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args).sum()
    return total


def test_training_memory_is_bounded_by_the_chunk():
    """The definition keeps a [b, d, n] state per step for backward; the chunked scan keeps
    only its inputs and one state per chunk, and recomputes the rest chunk by chunk."""
    b, length, d, n, chunk = 2, 512, 16, 8, 32
    chunked = _saved_bytes(lambda *a: selective_scan(*a, chunk=chunk), length)
    reference = _saved_bytes(selective_scan_reference, length)
    inputs = 4 * (3 * b * length * d + 2 * b * length * n)  # u (twice: scan and skip), delta, B, C
    per_chunk = 4 * (b * d * n + d * n + d)  # the carried state, A and D
    assert reference > 4 * b * length * d * n  # at least one [b, L, d, n] state history
    assert chunked <= inputs + (length // chunk) * per_chunk
    assert chunked < reference / 8


def test_mamba_layer_is_causal_and_bimamba_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 20, 8)
    later = x.clone()
    later[:, 15:] += 1.0
    mamba, bi = Mamba(8, d_state=4, expand=2, chunk=8), BiMamba(8, d_state=4, expand=2, chunk=8)
    with torch.no_grad():
        assert torch.allclose(mamba(x)[:, :15], mamba(later)[:, :15], atol=1e-6)
        assert not torch.allclose(mamba(x)[:, 15:], mamba(later)[:, 15:])
        assert not torch.allclose(bi(x)[:, :15], bi(later)[:, :15])
