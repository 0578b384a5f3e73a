"""The stacked model's own batch norm against each member's nn.BatchNorm1d."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.engine.nn.stacked import _Norm


def _members(k: int, width: int) -> list[nn.BatchNorm1d]:
    gen = torch.Generator().manual_seed(0)
    norms = [nn.BatchNorm1d(width) for _ in range(k)]
    with torch.no_grad():
        for norm in norms:  # members differ in their affine and running statistics
            for tensor in (norm.weight, norm.bias, norm.running_mean):
                tensor.copy_(torch.randn(width, generator=gen))
            norm.running_var.copy_(torch.rand(width, generator=gen) + 0.5)
    return norms


def test_stacked_batch_norm_gives_each_member_its_own_batch_norm_forward_backward_and_statistics():
    k, batch, width = 5, 16, 12
    norms = _members(k, width)
    stacked = _Norm.of(norms)
    for tensor in stacked.parameters():
        tensor.requires_grad_(True)
    h = (torch.randn(k, batch, width) * 3 + 1).requires_grad_(True)
    grad_out = torch.randn(k, batch, width)
    out = stacked(h, training=True)
    out.backward(grad_out)
    for m, norm in enumerate(norms):
        x = h[m].detach().clone().requires_grad_(True)
        alone = norm(x)
        alone.backward(grad_out[m])
        assert torch.allclose(out[m], alone, rtol=1e-5, atol=1e-6)
        assert torch.allclose(h.grad[m], x.grad, rtol=1e-5, atol=1e-6)
        assert torch.allclose(stacked.weight.grad[m], norm.weight.grad, rtol=1e-5, atol=1e-6)
        assert torch.allclose(stacked.bias.grad[m], norm.bias.grad, rtol=1e-5, atol=1e-6)
        assert torch.allclose(stacked.running_mean[m], norm.running_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(stacked.running_var[m], norm.running_var, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # evaluation: the running statistics both updated
            assert torch.allclose(
                stacked(h.detach(), training=False)[m], norm.eval()(h[m].detach()), rtol=1e-5, atol=1e-6
            )
    assert stacked.steps == 1
