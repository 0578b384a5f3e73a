"""K MLPs of one shape trained as one vectorized model (trial batching).

Initialization trials are small networks: one of them leaves most of a CPU core (or a GPU) idle
between tiny kernels. ``StackedMLP`` takes K built and initialized ``Network``s of the same
architecture and holds each layer's K weight matrices as one (K, out, in) tensor, so a forward
pass is one batched matmul per layer for all K trials. Member k only ever touches slice k: its
loss, its gradients, its normalization statistics. With an element-wise optimizer (SGD, Adam)
the sum of the members' losses therefore trains each exactly as it would train alone.

``stackable(model)`` says whether a model has the supported shape (an MLP: ``Linear`` layers,
any activation, normalization none/batch/layer/group); ``write_back`` copies each member's slice
into its own ``Network``, where diagnostics, evaluation and weight logging run unchanged.

Members may differ in activation (an activation is stateless and keeps the layer's width; maxout
narrows it, so its ``pieces`` are part of the shape): each run of consecutive members with the
same activation applies it to its slice, so a caller that orders members by activation pays one
extra concatenation per layer, not one call per member.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.engine.nn.models import Network

_NORMS = (nn.Identity, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)


def stackable(model: nn.Module) -> bool:
    """An MLP ``Network`` (flatten stem, Linear blocks, no pooling) with a supported norm."""
    if (
        not isinstance(model, Network)
        or not isinstance(model.stem, nn.Flatten)
        or not isinstance(model.pool, nn.Identity)
    ):
        return False
    return all(isinstance(b.layer, nn.Linear) and type(b.norm) in _NORMS for b in model.blocks)


def _stack(tensors: list[Optional[Tensor]]) -> Optional[Tensor]:
    if tensors[0] is None:
        return None
    return torch.stack([t.detach() for t in tensors]).contiguous()


@dataclass
class _Norm:
    """One layer's normalization for all K members: per-member affine and running statistics."""

    kind: type
    weight: Optional[Tensor] = None  # (K, W)
    bias: Optional[Tensor] = None
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    eps: float = 1e-5
    momentum: float = 0.1
    groups: int = 1
    steps: int = 0  # training batches seen (BatchNorm's num_batches_tracked)

    @classmethod
    def of(cls, norms: list[nn.Module]) -> _Norm:
        first = norms[0]
        if isinstance(first, nn.Identity):
            return cls(nn.Identity)
        params = {name: _stack([getattr(n, name, None) for n in norms]) for name in ("weight", "bias")}
        buffers = {name: _stack([getattr(n, name, None) for n in norms]) for name in ("running_mean", "running_var")}
        steps = int(first.num_batches_tracked) if isinstance(first, nn.BatchNorm1d) else 0
        return cls(
            type(first),
            **params,
            **buffers,
            eps=first.eps,
            momentum=getattr(first, "momentum", 0.1) or 0.1,
            groups=getattr(first, "num_groups", 1),
            steps=steps,
        )

    def __call__(self, h: Tensor, training: bool) -> Tensor:  # h: (K, B, W)
        if self.kind is nn.Identity:
            return h
        if self.kind is nn.BatchNorm1d:
            return self._batch_norm(h, training)
        if self.kind is nn.LayerNorm:
            h = F.layer_norm(h, h.shape[-1:], eps=self.eps)
        else:
            k, b, w = h.shape
            h = F.group_norm(h.reshape(k * b, w), self.groups, eps=self.eps).view(k, b, w)
        return h if self.weight is None else torch.addcmul(self.bias.unsqueeze(1), h, self.weight.unsqueeze(1))

    def _batch_norm(self, h: Tensor, training: bool) -> Tensor:
        """BatchNorm1d's rule, per member: batch statistics in training (and the running averages
        updated with the unbiased variance), running statistics in evaluation; then the affine."""
        if not training:
            xhat = (h - self.running_mean.unsqueeze(1)) * torch.rsqrt(self.running_var.unsqueeze(1) + self.eps)
            return (
                xhat if self.weight is None else torch.addcmul(self.bias.unsqueeze(1), xhat, self.weight.unsqueeze(1))
            )
        k, _, w = h.shape
        weight = self.weight if self.weight is not None else h.new_ones(k, w)
        bias = self.bias if self.bias is not None else h.new_zeros(k, w)
        out, mean, var = _StackedBatchNorm.apply(h, weight, bias, self.eps)
        with torch.no_grad():
            n = h.shape[1]
            self.steps += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
        return out

    def parameters(self) -> list[Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def state(self) -> tuple:
        stats = [t.clone() if t is not None else None for t in (self.running_mean, self.running_var)]
        return (*stats, self.steps)

    @torch.no_grad()
    def restore(self, state: tuple) -> None:
        mean, var, self.steps = state
        if mean is not None:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)

    def write_back(self, norm: nn.Module, k: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            source = getattr(self, name)
            if source is not None:
                getattr(norm, name).copy_(source[k])
        if self.kind is nn.BatchNorm1d:
            norm.num_batches_tracked.fill_(self.steps)


class _StackedBatchNorm(torch.autograd.Function):
    """A training step's batch norm for K members at once: (K, B, W) normalized over B, then
    ``weight`` and ``bias`` (K, W); also returns the batch mean and biased variance (K, W).

    Autograd through the same few operations (or ``var_mean``) took 5x longer at 32 members of
    width 128: its backward walks a dozen broadcasting element-wise ops, this one takes three
    passes. It is the formula of PyTorch's own batch norm backward, and so agrees with each
    member's ``BatchNorm1d`` to float rounding (forward and gradients: ~2e-7 relative).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, eps: float):
        mean = h.mean(dim=1, keepdim=True)
        centered = h - mean
        var = centered.square().mean(dim=1, keepdim=True)
        invstd = torch.rsqrt(var + eps)
        xhat = centered * invstd
        ctx.save_for_backward(xhat, invstd, weight)
        mean, var = mean.squeeze(1), var.squeeze(1)
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(bias.unsqueeze(1), xhat, weight.unsqueeze(1)), mean, var

    @staticmethod
    def backward(ctx, grad: Tensor, _mean: Tensor, _var: Tensor):
        xhat, invstd, weight = ctx.saved_tensors
        n = grad.shape[1]
        grad_sum = grad.sum(dim=1, keepdim=True)
        grad_dot_xhat = (grad * xhat).sum(dim=1, keepdim=True)
        grad_h = (grad - grad_sum / n - xhat * (grad_dot_xhat / n)) * (invstd * weight.unsqueeze(1))
        return grad_h, grad_dot_xhat.squeeze(1), grad_sum.squeeze(1), None


class StackedMLP:
    """K same-shaped MLP ``Network``s as one vectorized model; input (K, B, ...) -> logits (K, B, C)."""

    def __init__(self, models: list[Network]) -> None:
        if not all(stackable(m) for m in models):
            raise ValueError("StackedMLP needs MLP Networks (see stackable)")
        self.size = len(models)
        blocks = list(zip(*(m.blocks for m in models)))
        # Held as (K, in, out): h @ W needs no transpose, which makes the backward pass ~20% faster.
        self.weights = [_stack([b.layer.weight.T for b in layer]) for layer in blocks]
        self.biases = [_stack([b.layer.bias for b in layer]) for layer in blocks]
        self.norms = [_Norm.of([b.norm for b in layer]) for layer in blocks]
        self.acts = [_runs([b.act for b in layer]) for layer in blocks]
        self.residual = [layer[0].residual for layer in blocks]
        # The head in Linear's own layout (K, classes, in), used as h @ W^T like Linear: with 10
        # classes a contiguous (K, in, 10) operand and its weight gradient (K, in, B) @ (K, B, 10)
        # ran at a seventh of the matmul rate; this way the head's forward and backward take ~10%
        # less, and the rounding stays closer to the unbatched trial's.
        self.head_weight = _stack([m.head.weight for m in models])
        self.head_bias = _stack([m.head.bias for m in models])
        self.training = True
        for p in self.parameters():
            p.requires_grad_(True)

    def parameters(self) -> list[Tensor]:
        params = [t for t in self.weights + self.biases if t is not None]
        params += [p for norm in self.norms for p in norm.parameters()]
        return params + [t for t in (self.head_weight, self.head_bias) if t is not None]

    def train(self, mode: bool = True) -> StackedMLP:
        self.training = mode
        return self

    def __call__(self, x: Tensor, captures: Optional[list[dict]] = None) -> Tensor:
        """Logits (K, B, C). With ``captures`` (a list), each hidden layer appends what the probe
        reads: its output ``pre_act`` (kept in the graph), the activation's input and output."""
        h = x.flatten(2)
        for weight, bias, norm, act, residual in zip(self.weights, self.biases, self.norms, self.acts, self.residual):
            pre_act = _linear(h, weight, bias)
            act_in = norm(pre_act, self.training)
            out = _activate(act, act_in)
            if captures is not None:
                captures.append({"pre_act": pre_act, "act_in": act_in.detach(), "out": out.detach()})
            h = h + out if residual else out
        return _head(h, self.head_weight, self.head_bias)

    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """Train mode for a measurement that leaves no trace (normalization statistics restored)."""
        saved = [(norm, norm.state()) for norm in self.norms]
        was_training, self.training = self.training, True
        try:
            yield
        finally:
            self.training = was_training
            for norm, state in saved:
                norm.restore(state)

    @torch.no_grad()
    def write_back(self, models: list[Network], members: Optional[list[int]] = None) -> None:
        """Copy slice k into ``models[k]`` (for every k in ``members``, default all)."""
        for k in range(self.size) if members is None else members:
            model = models[k]
            for i, block in enumerate(model.blocks):
                block.layer.weight.copy_(self.weights[i][k].T)
                if self.biases[i] is not None:
                    block.layer.bias.copy_(self.biases[i][k])
                self.norms[i].write_back(block.norm, k)
            model.head.weight.copy_(self.head_weight[k])
            if self.head_bias is not None:
                model.head.bias.copy_(self.head_bias[k])


@dataclass(frozen=True)
class ActRun:
    """Members ``start`` to ``end`` (exclusive) share this activation module (stateless)."""

    start: int
    end: int
    module: nn.Module


def act_key(module: nn.Module) -> tuple:
    """Equal for two activation modules that compute the same function (type and settings), and
    orderable, so members can be sorted into runs."""
    settings = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
    return f"{type(module).__module__}.{type(module).__qualname__}", tuple(sorted(settings.items()))


def _runs(modules: list[nn.Module]) -> list[ActRun]:
    """Consecutive members with equal activations, as runs."""
    runs: list[ActRun] = []
    for k, module in enumerate(modules):
        if runs and act_key(runs[-1].module) == act_key(module):
            runs[-1] = ActRun(runs[-1].start, k + 1, runs[-1].module)
        else:
            runs.append(ActRun(k, k + 1, module))
    return runs


def _activate(runs: list[ActRun], h: Tensor) -> Tensor:
    """Each run's activation on its members' slice of (K, B, W); as (rows, W) since activations
    such as maxout expect features in dim 1, and maxout narrows them."""
    k, b, w = h.shape
    if len(runs) == 1:
        return runs[0].module(h.reshape(k * b, w)).view(k, b, -1)
    # split, not slicing: the backward of a slice is a zero-filled full-size gradient per run.
    parts = h.split([run.end - run.start for run in runs])
    return torch.cat([run.module(part.reshape(-1, w)).view(len(part), b, -1) for run, part in zip(runs, parts)])


def _head(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(K, B, in) and (K, classes, in) -> logits (K, B, classes): h @ W^T, as ``nn.Linear`` computes it."""
    return _linear(h, weight.transpose(1, 2), bias)


def _linear(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(K, B, in) @ (K, in, out) + (K, out): one batched matmul for all members."""
    if bias is None:
        return torch.bmm(h, weight)
    return torch.baddbmm(bias.unsqueeze(1), h, weight)
