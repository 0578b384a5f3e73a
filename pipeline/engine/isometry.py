"""Dynamical isometry at initialization (Pennington, Schoenholz & Ganguli 2017).

The input-output Jacobian J = dh/dx of a net at init, for a few probe inputs: mean-field theory
(pipeline/engine/theory.py) predicts the mean of its squared singular values (chi_1 per layer);
their spread is what separates orthogonal from Gaussian weights at criticality. An orthogonal
deep linear net has every singular value 1; Gaussian weights spread them more with each layer,
and with tanh at criticality orthogonal weights keep the spectrum narrow where Gaussian do not.

h is the input of the head (the last hidden layer's output, pooled in a CNN), not the logits:
the logits have only as many singular values as classes, and mix in the head, whose scale some
schemes set apart (a zero head, Fixup). This is the deep stack the theory describes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def features(model: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """x -> the head's input, for a model built as ``stem``, ``blocks``, ``pool`` and a head
    (pipeline/engine/nn/models.py); None for any other model."""
    if not all(hasattr(model, name) for name in ("stem", "blocks", "pool")):
        return None

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = model.stem(x)
        for block in model.blocks:
            h = block(h)
        return model.pool(h)

    return forward


def jacobians(fn: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor) -> torch.Tensor:
    """Each probe sample's Jacobian of ``fn``: (B, *in) -> (B, out, in), outputs and inputs flattened.

    One backward pass per output over the whole probe: without batch norm (which
    ``isometry_metrics`` refuses) samples never mix, so output d's gradient at sample b is row d of
    b's Jacobian. Plain autograd, not ``torch.func``'s vmap of jacrev: that imports torch._dynamo,
    1.2 CPU-seconds of every worker process's start.
    """
    x = probe.detach().clone().requires_grad_(True)
    out = fn(x).flatten(1)  # (B, out)
    rows = [torch.autograd.grad(out[:, d].sum(), x, retain_graph=True)[0] for d in range(out.shape[1])]
    return torch.stack(rows, dim=1).flatten(2)


def squared_singular_values(model: nn.Module, probe: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, min(out, in)) squared singular values of each probe sample's Jacobian; None where
    ``isometry_metrics`` does not apply."""
    fn = features(model)
    if fn is None or any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
        return None
    jac = jacobians(fn, probe)  # gradients with respect to the inputs only: no parameter's .grad is touched
    return torch.linalg.svdvals(jac.double()).square()


def spectrum_summary(sv2: torch.Tensor) -> dict[str, float]:
    """Mean and spread of squared singular values, pooled over samples."""
    values = sv2.flatten().double()
    levels = torch.tensor([0.05, 0.95], dtype=values.dtype, device=values.device)
    low, high = torch.quantile(values, levels).tolist()
    return {
        "isometry_sv2_mean": float(values.mean()),
        "isometry_sv2_std": float(values.std()) if values.numel() > 1 else 0.0,
        "isometry_sv2_p05": low,
        "isometry_sv2_p95": high,
        "isometry_sv2_min": float(values.min()),
        "isometry_sv2_max": float(values.max()),
    }


def isometry_metrics(model: nn.Module, probe: torch.Tensor) -> dict[str, float]:
    """The spectrum of the input-output Jacobian at a few probe inputs, as ``isometry_*`` metrics.

    Args:
        model: A built model of ``stem``, ``blocks`` and ``pool`` (MLP or CNN, residual or
            normalized alike, but not batch norm: a sample's Jacobian there depends on its batch).
        probe: A few inputs (B, *input_shape); 4-16 suffice, the cost grows with B * out * in.

    Returns:
        ``isometry_sv2_{mean,std,p05,p95,min,max}``, or {} where it does not apply (batch norm,
        recurrent and other models).
    """
    sv2 = squared_singular_values(model, probe)
    return {} if sv2 is None else spectrum_summary(sv2)
