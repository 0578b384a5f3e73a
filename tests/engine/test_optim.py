"""Optimizers (pipeline/engine/optim.py): every entry of ``OPTIMIZERS`` steps exactly as its reference,
and none imports torch._dynamo (what a torch.optim.Optimizer costs every worker at start-up)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.config import OptimizerConfig
from pipeline.engine.optim import OPTIMIZERS, build_optimizer


def _lars_reference(params, cfg: OptimizerConfig):
    """You, Gitman & Ginsburg (2017), Alg. 1, written out: local_lr = eta ||w|| / (||g|| + wd ||w||),
    v <- m v + lr local_lr (g + wd w), w <- w - v; vectors unadapted; a zero norm gives rate 1."""
    velocity = {}

    def step():
        with torch.no_grad():
            for w in (p for p in params if p.grad is not None):
                g = w.grad
                rate = 1.0
                if w.dim() > 1 and w.norm() > 0 and g.norm() > 0:
                    rate = cfg.trust_coefficient * w.norm() / (g.norm() + cfg.weight_decay * w.norm())
                update = (g + cfg.weight_decay * w) * (cfg.lr * rate)
                velocity[w] = velocity[w] * cfg.momentum + update if w in velocity else update
                w.sub_(velocity[w])

    return step


#: What each entry must equal (``fused`` as trial batching asks for it): torch.optim's own class,
#: whose ``step`` calls the same functional update (bit for bit), or the paper's rule (to rounding).
REFERENCES = {
    "sgd": lambda params, cfg, fused: (
        torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None
        ).step
    ),
    "adam": lambda params, cfg, fused: (
        torch.optim.Adam(
            params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, fused=fused or None
        ).step
    ),
    "lars": lambda params, cfg, fused: _lars_reference(params, cfg),
}
FUSABLE = ("sgd", "adam")
BIT_EQUAL = ("sgd", "adam")  # the same code path as torch.optim's


def test_every_optimizer_has_a_reference():
    assert set(REFERENCES) == set(OPTIMIZERS.names())


def _cases():
    for name in OPTIMIZERS.names():
        for fused in (False, True) if name in FUSABLE else (False,):
            for weight_decay, momentum in ((0.0, 0.9), (1e-3, 0.9), (0.0, 0.0)):
                yield pytest.param(
                    name,
                    fused,
                    weight_decay,
                    momentum,
                    id=f"{name}-{'fused' if fused else 'plain'}-wd{weight_decay}-m{momentum}",
                )


@pytest.mark.parametrize("name, fused, weight_decay, momentum", list(_cases()))
def test_each_optimizer_steps_exactly_as_its_reference(name, fused, weight_decay, momentum):
    cfg = OptimizerConfig(name=name, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    torch.manual_seed(0)
    start = [torch.randn(8, 5), torch.randn(8), torch.zeros(3, 8)]  # a zero layer: LARS's rate-1 case
    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    optimizer = build_optimizer(ours, cfg, fused=fused) if fused else build_optimizer(ours, cfg)
    reference_step = REFERENCES[name](theirs, cfg, fused)
    for step in range(6):
        grads = [torch.randn_like(t) for t in start]
        optimizer.zero_grad(set_to_none=True)
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = None if (step == 2 and p is params[1]) else g.clone()  # once, a parameter without a gradient
        optimizer.step()
        reference_step()
        for mine, reference in zip(ours, theirs):
            if name in BIT_EQUAL:
                assert torch.equal(mine, reference), (name, fused, step)
            else:
                torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], start[0])  # it moved


def test_zero_grad_clears_or_zeroes_the_gradients():
    p = torch.randn(3, requires_grad=True)
    optimizer = build_optimizer([p], OptimizerConfig(name="sgd", lr=0.1))
    p.grad = torch.ones(3)
    optimizer.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(3))
    optimizer.zero_grad()
    assert p.grad is None


def test_training_imports_no_dynamo():
    """A trial, alone and batched, with every optimizer: torch._dynamo stays unimported (1.2 s of CPU)."""
    code = (
        "import sys\n"
        "from pipeline.config.composition import compose\n"
        "from pipeline.engine.train import prepare_trial, train_trial\n"
        "from pipeline.engine.batched import train_batch\n"
        "for name in ('sgd', 'adam', 'lars'):\n"
        "    configs = [compose([f'optimizer={name}', 'train.epochs=1', 'model.width=16', f'initializer={i}']) for i in ('xavier_normal', 'orthogonal')]\n"
        "    train_trial(prepare_trial(configs[0]))\n"
        "    if name != 'lars':\n"
        "        train_batch([prepare_trial(c) for c in configs])\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
