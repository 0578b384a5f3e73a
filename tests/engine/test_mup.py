"""Parametrizations (``model.parametrization``): muP against the ``mup`` package, NTK against its
literal form, standard unchanged, and the validation and batching rules around them.

The ``mup`` package (PyPI ``mup`` 1.0.0) requires torchvision, whose wheels pin another torch, so
it is not a test extra: ``pip install --no-deps mup==1.0.0`` (it imports with torch and PyYAML
alone). Without it the comparisons with it are skipped; the rest runs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ActivationConfig, Config, ConfigError, ModelConfig, NormalizationConfig, OptimizerConfig
from pipeline.config.catalog import validate
from pipeline.engine.coord_check import CoordSetup, coord_check, width_slope
from pipeline.engine.nn.initializers import apply_init
from pipeline.engine.nn.models import Readout, build_model
from pipeline.engine.optim import Adam, build_optimizer
from pipeline.engine.train import prepare_trial, run_trial
from pipeline.study.grouping import batch_key

IN, CLASSES, DEPTH, BASE = 64, 10, 3, 64
WIDTHS = (128, 256)
OPTIMIZERS = {
    "sgd": OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": OptimizerConfig(name="adam", lr=1e-3, momentum=0.9, weight_decay=1e-3),
}


def ours(width: int, parametrization: str = "mup", seed: int = 0) -> nn.Module:
    """An MLP built and He-initialized (zero biases) as a trial is, in float64."""
    cfg = ModelConfig(depth=DEPTH, width=width, parametrization=parametrization, base_width=BASE)
    model = build_model(cfg, ActivationConfig("relu"), NormalizationConfig(), (IN,), CLASSES)
    apply_init(model, Config().initializer, 1.0, 2**0.5, torch.Generator().manual_seed(seed))
    return model.double()


def multiplier(model: nn.Module, name: str) -> float:
    """The fixed factor the forward pass applies to parameter ``name`` (muP's readout weight only)."""
    if name != "head.weight" or type(model.head) is nn.Linear:
        return 1.0
    head = model.head
    return head.multiplier if isinstance(head, Readout) else head.output_mult / head.width_mult()


def effective(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the forward pass multiplies by: each parameter times its multiplier."""
    return {name: p.detach() * multiplier(model, name) for name, p in model.named_parameters()}


def batches(steps: int = 5, size: int = 32):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(steps, size, IN, generator=generator, dtype=torch.float64)
    return list(zip(x, torch.randint(0, CLASSES, (steps, size), generator=generator)))


def train(model: nn.Module, optimizer, steps: int = 5) -> dict[str, torch.Tensor]:
    for x, y in batches(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return effective(model)


# --- the mup package --------------------------------------------------------------------------------


def _mup_model(width: int, mup) -> nn.Module:
    """Our MLP's shapes and parameter names, with the package's MuReadout as the head."""

    class Block(nn.Module):
        def __init__(self, fan_in: int) -> None:
            super().__init__()
            self.layer = nn.Linear(fan_in, width)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = mup.MuReadout(width, CLASSES)
            self.blocks = nn.ModuleList([Block(IN if i == 0 else width) for i in range(DEPTH)])

        def forward(self, x):
            for block in self.blocks:
                x = torch.relu(block.layer(x))
            return self.head(x)

    return MLP().double()


def theirs(width: int, mup) -> nn.Module:
    """The package's muP model, started from our model's initializer draws as its "SP init":
    ``set_base_shapes`` then rescales them (readout x sqrt(r), biases x sqrt(fan-in r))."""
    model = _mup_model(width, mup)
    with torch.no_grad():
        for name, p in ours(width, "standard").named_parameters():
            model.get_parameter(name).copy_(p)
    return mup.set_base_shapes(model, _mup_model(BASE, mup), delta=_mup_model(2 * BASE, mup))


def _their_optimizer(model, name: str, mup, eps: float = 1e-8):
    cfg = OPTIMIZERS[name]
    if name == "sgd":
        return mup.MuSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    betas = (cfg.momentum, 0.999)
    return mup.MuAdam(model.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=eps)


def effective_rates(model: nn.Module, groups, optimizer: str) -> dict[str, tuple[float, float]]:
    """Per parameter, (lr, weight decay) as the effective weight m * p sees them: a step on p moves
    m * p by lr * m^2 (SGD) or lr * m (Adam, which ignores the gradient's scale), and the decay
    term wd * p is wd / m^2 on the effective weight's gradient scale."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for params, lr, decay in groups:
        for p in params:
            m = multiplier(model, names[id(p)])
            out[names[id(p)]] = (lr * (m * m if optimizer == "sgd" else m), decay / (m * m))
    return out


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mup_rates_and_multipliers_equal_the_mup_package(width, optimizer):
    mup = pytest.importorskip("mup")
    model, reference = ours(width), theirs(width, mup)
    mine = build_optimizer(model.parameters(), OPTIMIZERS[optimizer])
    their_groups = [
        (g["params"], g["lr"], g["weight_decay"]) for g in _their_optimizer(reference, optimizer, mup).param_groups
    ]
    expected = effective_rates(reference, their_groups, optimizer)
    got = effective_rates(model, mine.groups, optimizer)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    assert model.head.multiplier == pytest.approx(width_mult(width) ** -0.5)


def width_mult(width: int) -> float:
    return width / BASE


@pytest.mark.parametrize("width", WIDTHS)
def test_mup_init_equals_the_mup_package(width):
    """Same effective weights at init: the readout's variance / r, every other layer the initializer's."""
    mup = pytest.importorskip("mup")
    got, expected = effective(ours(width)), effective(theirs(width, mup))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=0)
    standard = ours(width, "standard").head.weight
    assert got["head.weight"].std() == pytest.approx(standard.std().item() / math.sqrt(width_mult(width)))


#: Adam's eps, in the training comparison: the readout's gradients are sqrt(r) times the package's
#: (its weights are stored sqrt(r) times smaller), so a finite eps weighs differently on them; with
#: torch's 1e-8 the readouts differ by up to 0.1% of their movement, in entries of tiny gradient.
ADAM_EPS = 1e-30


def _stepper(model, name: str, mup=None):
    cfg = OPTIMIZERS[name]
    if mup is not None:
        return _their_optimizer(model, name, mup, eps=ADAM_EPS)
    if name == "sgd":
        return build_optimizer(model.parameters(), cfg)
    return Adam(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, eps=ADAM_EPS)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mup_training_steps_equal_the_mup_package(width, optimizer):
    """Five steps with momentum and weight decay give the same effective weights, to rounding."""
    mup = pytest.importorskip("mup")
    model, reference = ours(width), theirs(width, mup)
    got = train(model, _stepper(model, optimizer))
    expected = train(reference, _stepper(reference, optimizer, mup))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)
        assert not torch.equal(got[name], effective(ours(width))[name]), f"{name} did not train"


# --- NTK: its literal form -------------------------------------------------------------------------


class LiteralNTK(nn.Module):
    """Jacot et al. 2018: each layer x -> (w / sqrt(fan_in)) x + b, every w stored sqrt(fan_in)
    times the effective weight and trained at one learning rate."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        linears = [block.layer for block in model.blocks] + [model.head]
        self.weights = nn.ParameterList(
            nn.Parameter(layer.weight.detach() * math.sqrt(layer.in_features)) for layer in linears
        )
        self.biases = nn.ParameterList(nn.Parameter(layer.bias.detach().clone()) for layer in linears)

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = F.linear(x, w / math.sqrt(w.shape[1]), b)
            x = torch.relu(x) if i < len(self.weights) - 1 else x
        return x

    def effective(self) -> list[torch.Tensor]:
        return [t for w, b in zip(self.weights, self.biases) for t in (w.detach() / math.sqrt(w.shape[1]), b.detach())]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ntk_trains_as_its_literal_form(optimizer):
    model = ours(256, "ntk")
    literal = LiteralNTK(model)
    cfg = OPTIMIZERS[optimizer]
    if optimizer == "sgd":
        reference = torch.optim.SGD(
            literal.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        reference = torch.optim.Adam(literal.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=ADAM_EPS)
    got = train(model, _stepper(model, optimizer))
    train(literal, reference)
    mine = [
        got[f"{prefix}.{kind}"]
        for prefix in [f"blocks.{i}.layer" for i in range(DEPTH)] + ["head"]
        for kind in ("weight", "bias")
    ]
    for a, b in zip(mine, literal.effective(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --- standard, validation, batching ----------------------------------------------------------------


def test_standard_is_untouched_and_mup_at_its_base_width_is_standard():
    standard = ours(BASE, "standard")
    assert type(standard.head) is nn.Linear
    assert not any(hasattr(p, "scaling") for p in standard.parameters())
    at_base = ours(BASE, "mup")
    for name in OPTIMIZERS:
        a, b = ours(BASE, "standard"), ours(BASE, "mup")
        got = train(b, build_optimizer(b.parameters(), OPTIMIZERS[name]))
        expected = train(a, build_optimizer(a.parameters(), OPTIMIZERS[name]))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert at_base.head.multiplier == 1.0


def _config(**model) -> Config:
    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_a_parametrization_is_validated_in_one_line_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"^model.parametrization=mu is invalid; valid: standard, ntk, mup$"):
        validate(_config(parametrization="mu"))
    with pytest.raises(ConfigError, match=r"model.parametrization=mup is for model=mlp; model=cnn takes standard"):
        validate(_config(parametrization="mup", name="cnn"))
    with pytest.raises(ConfigError, match=r"model.base_width=0 is invalid"):
        validate(_config(parametrization="mup", base_width=0))
    lars = _config(parametrization="ntk")
    lars.optimizer.name = "lars"
    with pytest.raises(ConfigError, match=r"optimizer=sgd\|adam; optimizer=lars takes standard"):
        validate(lars)
    for name in ("standard", "ntk", "mup"):
        validate(_config(parametrization=name))


def test_ntk_and_mup_trials_train_alone(make_config):
    assert batch_key(make_config()) is not None
    for name in ("ntk", "mup"):
        assert batch_key(make_config(f"model.parametrization={name}")) is None


# --- the coordinate check --------------------------------------------------------------------------


def test_coordinate_check_is_flat_in_width_under_mup_and_grows_under_standard():
    """SGD lr 0.5, widths 64-512, after 4 updates: the slope of log mean|x| against log width.
    Measured (2 seeds): standard logits +1.5 (and their change +1.4); muP every layer within +-0.17."""
    widths, steps = (64, 128, 256, 512), 5
    standard = coord_check(CoordSetup(widths=widths, parametrization="standard", steps=steps, seeds=2))
    mup = coord_check(CoordSetup(widths=widths, parametrization="mup", steps=steps, seeds=2))
    for size in ("l1", "delta"):
        assert width_slope(standard, "logits", steps, size) > 0.7
        for layer in ("h1", "h2", "h3", "logits"):
            assert abs(width_slope(mup, layer, steps, size)) < 0.3, (layer, size)
    # At init muP's logits shrink as 1/sqrt(width) (its readout's variance / r); the standard ones do not.
    assert width_slope(mup, "logits", 1) == pytest.approx(-0.5, abs=0.1)
    assert abs(width_slope(standard, "logits", 1)) < 0.1


def test_a_trial_carries_its_parametrization_to_the_optimizer(make_config):
    """Through the trial engine (config, model moved to its device, optimizer): muP at r = 2 steps
    with SGD's two rates; at r = 1 the trial is the standard one, metric for metric."""
    prep = prepare_trial(make_config("model.parametrization=mup", "model.base_width=16"))
    lr = prep.cfg.optimizer.lr
    groups = build_optimizer(prep.model.parameters(), prep.cfg.optimizer).groups
    assert {group_lr for _, group_lr, _ in groups} == {lr, 2 * lr}
    mup, standard = (
        run_trial(make_config(f"model.parametrization={p}", "model.base_width=32")) for p in ("mup", "standard")
    )
    assert mup.history == standard.history
