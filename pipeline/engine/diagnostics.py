"""Signal-propagation diagnostics on a fixed probe batch.

What each number tells (docs/initializers.md explains the science):
- ``act_std``: std of a hidden layer's output. Roughly constant in depth when healthy; geometric
  decay (vanishing) or growth (exploding) otherwise. Summary: ``act_std_ratio`` = last / first.
- ``grad_norm``: norm of dL/dh with respect to the layer's PRE-activation h (the backprop signal).
  Summary: ``grad_norm_ratio`` = first / last hidden layer; 0.7-1.4 is healthy, << 1 vanishing.
  The weight-gradient norm (``weight_grad_norm``) is kept in the table but is misleading alone:
  Xavier+ReLU at depth 30 has a weight-gradient ratio of 0.44 while the backprop ratio is 4e-5.
- ``dead_fraction``: units whose activation input is <= 0 on every probe sample (for conv layers a
  channel at every position): dead ReLUs, or a symmetric net that never left zero.
- ``saturated_fraction``: tanh |h| > 0.99, sigmoid h < 0.01 or > 0.99 (only for those activations).

The probe runs in train mode (batch norm uses batch statistics, as it does while training) and
leaves no trace: gradients come from ``torch.autograd.grad`` (``.grad`` is untouched) and
normalization buffers are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Saturation = Optional[Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class Probe:
    """One probe's outcome: a row per hidden layer and the scalar summaries."""

    layers: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, saturated: Saturation = None) -> Probe:
    """Run one hooked forward/backward pass of ``model`` on ``(x, y)`` and measure every hidden layer."""
    if getattr(model, "recurrent", False):
        return probe_recurrent(model, x, y, saturated)
    with probing(model), _captured(model.blocks) as captures:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        pre_acts = [c["pre_act"] for c in captures]
        weights = [block.layer.weight for block in model.blocks]
        grads = torch.autograd.grad(loss, pre_acts + weights, allow_unused=True)
    n = len(pre_acts)
    # As member 0 of a stack: one code path, and every number comes back in one host transfer.
    members = [_as_member(c) for c in captures]
    (layers,) = _table(members, [_one(g) for g in grads[:n]], [_one(g) for g in grads[n:]], [saturated])
    return Probe(layers, _summarize(layers, float(loss.detach()), float(logits.detach().std())))


def _one(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.unsqueeze(0)


def _as_member(capture: dict) -> dict:
    """One model's capture shaped as member 0 of a stack: (1, samples, units), where a conv
    layer's units are its channels. ``act_in`` only feeds ``dead_fraction`` (a max over the
    samples), so a conv layer's comes already reduced over every (sample, position) pair, as
    (1, 1, channels): the same maxima without a channels-last copy of the activations."""
    act_in = capture["act_in"]
    if act_in.dim() > 2:  # (B, C, *positions) -> (1, C)
        act_in = act_in.amax(dim=[d for d in range(act_in.dim()) if d != 1]).unsqueeze(0)
    return {"out": capture["out"].unsqueeze(0), "act_in": act_in.unsqueeze(0)}


def probe_recurrent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, saturated: Saturation = None) -> Probe:
    """For a recurrent net the signal's path is time: one row per step of the top layer.

    ``grad_norm`` is ||dL/dh_t||, the gradient with respect to the hidden state at step t: how far
    back a gradient reaches. ``grad_norm_ratio`` is first step over last (<< 1: it vanishes on its
    way back), ``act_std_ratio`` last step over first; ``spectral_radius`` is the recurrent
    matrix's largest |eigenvalue| (the candidate block of a GRU).
    """
    top = model.layers[-1]
    with probing(model):
        top.capture = True
        try:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, top.states, allow_unused=True)
        finally:
            top.capture = False
    layers = [_step_row(t, h.detach(), g, saturated) for t, (h, g) in enumerate(zip(top.states, grads))]
    top.states = []
    summary = _summarize(layers, float(loss.detach()), float(logits.detach().std()))
    summary["spectral_radius"] = model.spectral_radius()
    return Probe(layers, summary)


def probe_stacked(stacked, x: torch.Tensor, y: torch.Tensor, saturated: list[Saturation]) -> list[Probe]:
    """``probe`` for every member of a ``StackedMLP`` at once (trial batching): the same numbers
    each member's own ``probe`` gives, from one vectorized forward/backward pass. ``saturated``
    has one entry per member (members may differ in activation)."""
    k = stacked.size
    with stacked.probing():
        captures: list[dict] = []
        logits = stacked(x.unsqueeze(0).expand(k, *x.shape), captures)
        targets = y.unsqueeze(0).expand(k, -1)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(k, -1).mean(dim=1)
        pre_acts = [c["pre_act"] for c in captures]
        grads = torch.autograd.grad(losses.sum(), pre_acts + stacked.weights, allow_unused=True)
    n = len(pre_acts)
    table = _table(captures, list(grads[:n]), list(grads[n:]), saturated)
    probe_loss, logit_std = losses.detach().tolist(), _std(logits.detach().flatten(1)).tolist()
    return [Probe(layers, _summarize(layers, probe_loss[k], logit_std[k])) for k, layers in enumerate(table)]


def _table(captures: list[dict], pre_grads: list, weight_grads: list, saturated: list[Saturation]) -> list[list[dict]]:
    """``[member][layer]`` rows from every layer's captures of K stacked members, (K, samples, units);
    ``saturated[k]`` is member k's saturation test (None: its rows have no saturated_fraction).

    Every number of every layer and member comes back in one host transfer.
    """
    outs, act_ins = [c["out"] for c in captures], [c["act_in"] for c in captures]
    columns = {
        "act_std": _per_layer(outs, lambda t: _std(t.flatten(2))),
        "grad_norm": _per_layer(_or_zeros(pre_grads, outs), lambda t: t.flatten(2).norm(dim=2)),
        "weight_grad_norm": _per_layer(_or_zeros(weight_grads, outs), lambda t: t.flatten(2).norm(dim=2)),
        # A unit is dead if its largest input over the samples is <= 0 (NaN: not dead, as with all()),
        # a max-reduction 3x faster on the CPU than all() over the samples' dimension.
        "dead_fraction": _per_layer(act_ins, lambda t: (t.amax(dim=2) <= 0).float().mean(dim=2)),
    }
    if any(test is not None for test in saturated):
        columns["saturated_fraction"] = _saturation(outs, saturated)
    names = list(columns)
    table = torch.stack([columns[name] for name in names], dim=-1).transpose(0, 1).tolist()  # (K, layers, names)
    return [
        [_row(i, names, values, test is not None) for i, values in enumerate(member)]
        for member, test in zip(table, saturated)
    ]


def _row(index: int, names: list[str], values: list[float], saturates: bool) -> dict:
    row = {"layer": index + 1, **dict(zip(names, values))}
    if not saturates:
        row.pop("saturated_fraction", None)
    return row


def _saturation(outs: list[torch.Tensor], saturated: list[Saturation]) -> torch.Tensor:
    """(layers, K) saturated fractions: each test on the members it belongs to (NaN elsewhere)."""
    column = torch.full((len(outs), len(saturated)), float("nan"), device=outs[0].device)
    for test in {t for t in saturated if t is not None}:
        members = [k for k, t in enumerate(saturated) if t is test]
        column[:, members] = _per_layer([o[members] for o in outs], lambda t: test(t).float().flatten(2).mean(dim=2))
    return column


def _per_layer(tensors: list[torch.Tensor], stat: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``stat`` of each (K, ...) layer tensor, as a (layers, K) tensor (``stat`` reduces (1, K, ...) to (1, K))."""
    return torch.cat([stat(t.unsqueeze(0)) for t in tensors])


def _std(t: torch.Tensor) -> torch.Tensor:
    """Sample std over the last dim, two-pass (as stable as ``Tensor.std``, whose reduction over a
    dim runs about 10x slower on the CPU than these vectorized passes)."""
    if t.shape[:-1].numel() == 1:  # one member's one layer: the whole-tensor reduction is the fast one
        return t.std().reshape(t.shape[:-1])
    centered = t - t.mean(dim=-1, keepdim=True)
    return centered.square().sum(dim=-1).div(max(t.shape[-1] - 1, 1)).sqrt()


def _or_zeros(grads: list[Optional[torch.Tensor]], like: list[torch.Tensor]) -> list[torch.Tensor]:
    # A gradient autograd did not reach (a layer cut off from the loss) measures as zero.
    return [torch.zeros(o.shape[0], 1, device=o.device) if g is None else g for g, o in zip(grads, like)]


def update_ratios_stacked(weights: list[torch.Tensor], before: list[torch.Tensor], steps: int) -> list[list[float]]:
    """``update_ratios`` for every member: ``[member][layer]`` from stacked (K, ...) weights."""
    rows = []
    for now, old in zip(weights, before):
        delta, norm = (now.detach() - old).flatten(1).norm(dim=1), old.flatten(1).norm(dim=1)
        rows.append([_ratio(d, o) / max(steps, 1) for d, o in zip(delta.tolist(), norm.tolist())])
    return [list(member) for member in zip(*rows)]


def _step_row(index: int, h: torch.Tensor, grad, saturated: Saturation) -> dict:
    row = {
        "layer": index + 1,
        "time_step": index + 1,
        "act_std": float(h.std()),
        "grad_norm": _norm(grad),
        "dead_fraction": _dead_fraction(h),
    }
    if saturated is not None:
        row["saturated_fraction"] = float(saturated(h).float().mean())
    return row


def _norm(t: Optional[torch.Tensor]) -> float:
    return 0.0 if t is None else float(t.norm())


def _dead_fraction(act_in: torch.Tensor) -> float:
    # (B, C, *positions) -> (C,): a unit is dead if never positive over samples and positions.
    per_unit = act_in.transpose(0, 1).reshape(act_in.shape[1], -1)
    return float((per_unit.amax(dim=1) <= 0).float().mean())


def _summarize(layers: list[dict], probe_loss: float, logit_std: float) -> dict[str, float]:
    first, last = layers[0], layers[-1]
    summary = {
        "probe_loss": probe_loss,
        "logit_std": logit_std,
        "act_std_ratio": _ratio(last["act_std"], first["act_std"]),
        "grad_norm_ratio": _ratio(first["grad_norm"], last["grad_norm"]),
        "dead_fraction": sum(r["dead_fraction"] for r in layers) / len(layers),
    }
    if "saturated_fraction" in first:
        summary["saturated_fraction"] = sum(r["saturated_fraction"] for r in layers) / len(layers)
    return summary


def _ratio(num: float, den: float) -> float:
    # 0/0 happens in a net that is exactly zero (zeros init): report 0, "no signal", not NaN.
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


@contextlib.contextmanager
def _captured(blocks: nn.ModuleList) -> Iterator[list[dict]]:
    """Per block, what its next forward passes keep: the layer's output (pre-activation, in the
    graph: the backprop gradient is taken with respect to it), the activation's input and output."""
    captures = [{} for _ in blocks]
    for capture, block in zip(captures, blocks):
        block.capture = capture
    try:
        yield captures
    finally:
        for block in blocks:
            block.capture = None


@contextlib.contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """Train mode for a measurement that must leave no trace: mode and buffers restored after."""
    # Train mode for the probe (batch norm on batch statistics, as in training): the trainer calls
    # it right after evaluate(), which left the model in eval mode, where an untrained batch norm is
    # the identity and the probe would report the unnormalized net's signal. Mode restored after.
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    was_training = model.training
    if not was_training:  # a walk over every module: skipped when the trainer left it in train mode
        model.train()
    try:
        yield
    finally:
        if not was_training:
            model.eval()
        if saved:  # an MLP without normalization has none: no second walk over its modules
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    buf.copy_(saved[name])


def weight_snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the hidden layers' weights, to measure how far an epoch moved them."""
    return [w.detach().clone() for w in model.hidden_weights()]


def update_ratios(model: nn.Module, before: list[torch.Tensor], steps: int) -> list[float]:
    """Per layer ||W_now - W_before|| / ||W_before|| / steps: the mean relative update per step.

    About 1e-3 is healthy; 1e-8 and below means nothing moves.
    """
    ratios = []
    for weight, old in zip(model.hidden_weights(), before):
        delta = float((weight.detach() - old).norm())
        ratios.append(_ratio(delta, float(old.norm())) / max(steps, 1))
    return ratios
