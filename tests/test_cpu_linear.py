"""Linear layers through oneDNN for fp32 CPU inference (proscale/kernels/linear.py): same values
as F.linear, taken only where no gradient, autocast or tracing needs the standard operator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proscale.analysis.flop_counter import FlopCounter
from proscale.kernels import linear as linear_mod
from proscale.kernels.linear import Linear, linear, use_onednn
from proscale.models.transformer_decoder import mask_logits

pytestmark = pytest.mark.skipif(not linear_mod.onednn_available(), reason="torch built without oneDNN")


def _ops(fn) -> set[str]:
    """Names of the operators `fn` dispatches (counted by the FLOP counter's dispatch mode)."""
    counter = FlopCounter(root="all")
    with counter:
        fn()
    return set(counter.by_op["all"]) | {k.split(".")[1] for k in counter.unsupported["all"]}


@pytest.mark.parametrize("relu", [False, True])
def test_onednn_equals_f_linear(relu):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 57, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    ref = F.linear(x, w, b)
    ref = F.relu(ref) if relu else ref
    with torch.no_grad():
        assert use_onednn(x, w)
        got = linear(x, w, b, relu=relu)
        assert "_linear_pointwise" in _ops(lambda: linear(x, w, b, relu=relu))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if relu:
        assert (got >= 0).all() and (got == 0).any()


def test_falls_back_where_onednn_cannot_serve():
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    # Training: a gradient is wanted, so the autograd-aware operator runs and gradients flow.
    assert not use_onednn(x, layer.weight)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert use_onednn(x, layer.weight)
        assert not use_onednn(x.double(), layer.weight.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not use_onednn(x, layer.weight)  # autocast's bf16 linear is oneDNN already
            assert layer(x).dtype == torch.bfloat16
        graph = str(torch.jit.trace(layer, (x,)).graph)  # tracing: the standard operator in the graph
        assert "aten::linear" in graph and "mkldnn" not in graph


def test_environment_switch(monkeypatch):
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    monkeypatch.setenv("PROSCALE_LINEAR", "aten")
    linear_mod.onednn_available.cache_clear()
    try:
        with torch.no_grad():
            assert not use_onednn(x, w)
            assert "_linear_pointwise" not in _ops(lambda: linear(x, w))
    finally:
        monkeypatch.delenv("PROSCALE_LINEAR")
        linear_mod.onednn_available.cache_clear()


def test_flop_counter_counts_onednn_like_addmm():
    layer = Linear(32, 48)
    x = torch.randn(2, 10, 32)

    def count():
        counter = FlopCounter(root="all")
        with counter:
            layer(x)
        return counter.flops["all"]

    with torch.no_grad():
        fast = count()
    assert fast == count() == 2 * 10 * 32 * 48


@pytest.mark.parametrize("batch", [1, 3])
def test_mask_logits_equal_the_einsum(batch):
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(batch, 7, 16, generator=g)
    features = torch.randn(batch, 16, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    ref = torch.einsum("bqc,bchw->bqhw", embed, features)
    with torch.no_grad():
        got = mask_logits(embed, features)
        assert _ops(lambda: mask_logits(embed, features)) == {"convolution"}  # oneDNN, not bmm
    assert got.shape == (batch, 7, 9, 11)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # With gradients: the einsum, and its gradient reaches the embeddings.
    embed.requires_grad_(True)
    mask_logits(embed, features).sum().backward()
    torch.testing.assert_close(embed.grad, features.sum((2, 3))[:, None].expand_as(embed))
