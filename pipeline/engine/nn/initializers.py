"""Weight initializers: ``INITIALIZERS`` (one entry per scheme) and their model-level application.

Registry contract: an entry is ``fn(tensor, args: InitArgs) -> None``. It fills ``tensor`` in place
(under ``torch.no_grad``), draws every random number from ``args.generator``, and reads only the
options of ``args.cfg`` its scheme names (``mode``, ``std``, ``bound``, ``value``,
``factor``, ``distribution``, ``gain``). Where ``torch.nn.init`` has the scheme the entry calls it,
so ``kaiming_normal`` with ``gain: auto`` and a ReLU equals ``torch.nn.init.kaiming_normal_``.
Fans use PyTorch's layout ``(out, in, *kernel)``: fan_in = in * prod(kernel), fan_out = out *
prod(kernel). ``pretrained`` is registered so that it validates and lists like the others, but it
sets a whole model at once (``load_pretrained``), not one tensor. ``lsuv`` is data-dependent: its
entry is LSUV's first step (an orthonormal matrix), and ``apply_init`` then rescales the model's
layers on a probe batch of training inputs (``lsuv_normalize``, listed in ``DATA_DEPENDENT``).

The one meaning of scale: ``scale`` multiplies the standard deviation (or bound) the scheme would
otherwise give; ``gain`` likewise multiplies the std, as in PyTorch; Keras's variance factor
(``initializer.factor``) multiplies the variance. So ``scale=2`` doubles every weight's std whatever
the scheme (``constant``: the value; ``zeros`` stays zero), and ``variance_scaling`` with
``factor=2`` equals Keras's ``VarianceScaling(scale=2)``. Biases are never multiplied by scale.
For ``lsuv`` scale multiplies the weights LSUV found (each normalized to output variance 1 in
turn), so the first layer's output variance is scale^2 (the target variance), as for any scheme.

Which weights: ``apply_init`` sets every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.Conv3d`` weight with ``init_weight`` and its bias with ``init_bias``; normalization layers
keep their defaults (weight 1, bias 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, InitializerConfig
from pipeline.config.catalog import (
    BIAS_INITIALIZERS,
    DISTRIBUTIONS,
    INITIALIZERS,
    KAIMING_MODES,
    VARIANCE_MODES,
    check_bias,
    check_choice,
    check_pretrained_source,
)
from pipeline.engine.diagnostics import probing
from pipeline.engine.weights import load_weights_file

__all__ = [
    "BIAS_INITIALIZERS",
    "DATA_DEPENDENT",
    "INITIALIZERS",
    "LSUV_MAX_ITER",
    "LSUV_TOL",
    "TRUNC_NORMAL_STD_CORRECTION",
    "InitArgs",
    "WeightInit",
    "apply_init",
    "init_bias",
    "init_weight",
    "load_pretrained",
    "lsuv_normalize",
]

#: std of N(0, 1) truncated at +-2, so N(0, (s/c)^2) truncated at +-2s/c has std s (Keras, timm).
TRUNC_NORMAL_STD_CORRECTION = 0.87962566103423978
#: The layers whose weight and bias ``apply_init`` sets.
INIT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: LSUV (Mishkin & Matas 2015): stop once |Var(layer output) - 1| < tol, after at most max_iter rescalings.
LSUV_TOL = 0.02
LSUV_MAX_ITER = 20


@dataclass(frozen=True)
class InitArgs:
    """What an entry needs beyond the tensor.

    Attributes:
        cfg: The scheme's own options.
        scale: Multiplies the std (or bound) the scheme would give.
        activation_gain: What ``cfg.gain == "auto"`` resolves to (``activations.activation_gain``).
        generator: The source of every random number; None: torch's global generator.
    """

    cfg: InitializerConfig
    scale: float
    activation_gain: float
    generator: Optional[torch.Generator] = None

    @property
    def gain(self) -> float:
        return self.activation_gain if self.cfg.gain == "auto" else float(self.cfg.gain)


WeightInit = Callable[[Tensor, InitArgs], None]

# INITIALIZERS (pipeline/config/catalog.py) maps each declared name to its ``WeightInit``, registered below.


# --- fans and the one variance-scaling primitive -----------------------------------------------


def _require_2d(tensor: Tensor, name: str) -> None:
    if tensor.dim() < 2:
        raise ConfigError(f"{name} needs a tensor of at least 2 dimensions, got shape {tuple(tensor.shape)}")


def _fan(tensor: Tensor, mode: str, name: str, valid: tuple[str, ...]) -> float:
    """fan_in, fan_out or their mean, in PyTorch's layout (out, in, *kernel)."""
    check_choice("initializer.mode", mode, valid, name)
    _require_2d(tensor, name)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def _fill_normal(tensor: Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    nn.init.normal_(tensor, 0.0, std, generator=generator)


def _fill_uniform(tensor: Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    # Computed as torch.nn.init.kaiming_uniform_ does, so the same seed gives the same tensor.
    bound = math.sqrt(3.0) * std
    nn.init.uniform_(tensor, -bound, bound, generator=generator)


def _fill_truncated(tensor: Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    # Widen before truncating at +-2 wide so the std after truncation is `std` (Keras). torch's
    # trunc_normal_ takes absolute bounds, not multiples of its std.
    wide = std / TRUNC_NORMAL_STD_CORRECTION
    nn.init.trunc_normal_(tensor, 0.0, wide, -2.0 * wide, 2.0 * wide, generator=generator)


#: distribution -> fill with zero mean and the given std: the one primitive under kaiming, lecun and
#: variance_scaling, so that scale means the same thing in all of them.
_FILLS = {"normal": _fill_normal, "uniform": _fill_uniform, "truncated_normal": _fill_truncated}


def _fan_scaled(tensor: Tensor, args: InitArgs, name: str, gain: float, mode: str, distribution: str) -> None:
    """std = gain * scale / sqrt(fan): PyTorch's kaiming formula, with our scale on top."""
    # torch's kaiming_* take a nonlinearity, not a gain, and cannot express gain="auto" for elu,
    # gelu or silu, nor a scale; so compute the std as they do and fill with their primitives.
    std = gain * args.scale / math.sqrt(_fan(tensor, mode, name, KAIMING_MODES))
    _FILLS[distribution](tensor, std, args.generator)


# --- the entries ----------------------------------------------------------------------------------


@INITIALIZERS.register("zeros")
def _zeros(tensor: Tensor, args: InitArgs) -> None:
    nn.init.zeros_(tensor)


@INITIALIZERS.register("constant")
def _constant(tensor: Tensor, args: InitArgs) -> None:
    nn.init.constant_(tensor, args.cfg.value * args.scale)


@INITIALIZERS.register("normal")
def _normal(tensor: Tensor, args: InitArgs) -> None:
    nn.init.normal_(tensor, 0.0, args.cfg.std * args.scale, generator=args.generator)


@INITIALIZERS.register("uniform")
def _uniform(tensor: Tensor, args: InitArgs) -> None:
    bound = args.cfg.bound * args.scale
    nn.init.uniform_(tensor, -bound, bound, generator=args.generator)


@INITIALIZERS.register("xavier_uniform", "glorot_uniform")
def _xavier_uniform(tensor: Tensor, args: InitArgs) -> None:
    _require_2d(tensor, "xavier_uniform")
    nn.init.xavier_uniform_(tensor, gain=args.gain * args.scale, generator=args.generator)


@INITIALIZERS.register("xavier_normal", "glorot_normal")
def _xavier_normal(tensor: Tensor, args: InitArgs) -> None:
    _require_2d(tensor, "xavier_normal")
    nn.init.xavier_normal_(tensor, gain=args.gain * args.scale, generator=args.generator)


@INITIALIZERS.register("kaiming_uniform", "he_uniform")
def _kaiming_uniform(tensor: Tensor, args: InitArgs) -> None:
    _fan_scaled(tensor, args, "kaiming_uniform", args.gain, args.cfg.mode, "uniform")


@INITIALIZERS.register("kaiming_normal", "he_normal")
def _kaiming_normal(tensor: Tensor, args: InitArgs) -> None:
    _fan_scaled(tensor, args, "kaiming_normal", args.gain, args.cfg.mode, "normal")


# LeCun is Var 1/fan_in by definition (PyTorch: kaiming with nonlinearity="linear"), so it ignores
# initializer.gain and initializer.mode; its normal is untruncated, as PyTorch's kaiming_normal_.
# Keras's truncated lecun_normal is variance_scaling (factor 1, fan_in, truncated_normal).
@INITIALIZERS.register("lecun_uniform")
def _lecun_uniform(tensor: Tensor, args: InitArgs) -> None:
    _fan_scaled(tensor, args, "lecun_uniform", 1.0, "fan_in", "uniform")


@INITIALIZERS.register("lecun_normal")
def _lecun_normal(tensor: Tensor, args: InitArgs) -> None:
    _fan_scaled(tensor, args, "lecun_normal", 1.0, "fan_in", "normal")


@INITIALIZERS.register("orthogonal")
def _orthogonal(tensor: Tensor, args: InitArgs) -> None:
    _require_2d(tensor, "orthogonal")
    nn.init.orthogonal_(tensor, gain=args.gain * args.scale, generator=args.generator)


@INITIALIZERS.register("delta_orthogonal")
def _delta_orthogonal(tensor: Tensor, args: InitArgs) -> None:
    """Xiao et al. 2018: a conv kernel that is zero except an orthogonal centre tap, times gain * scale.

    At init each conv then maps every position's channel vector by one orthogonal (out, in) matrix
    (norm-preserving: needs in <= out). A 2-D weight (a Linear layer, e.g. the head) has no taps:
    it gets a plain orthogonal matrix. For an even kernel the tap is index k // 2, the one that
    reads the same position under the models' padding k // 2.
    """
    _require_2d(tensor, "delta_orthogonal")
    gain = args.gain * args.scale
    if tensor.dim() == 2:
        nn.init.orthogonal_(tensor, gain=gain, generator=args.generator)
        return
    out_channels, in_channels = tensor.shape[:2]
    if in_channels > out_channels:
        raise ConfigError(
            f"delta_orthogonal needs in_channels <= out_channels (an orthogonal centre tap that preserves norms); "
            f"got a conv kernel of shape {tuple(tensor.shape)} with {in_channels} > {out_channels}; "
            f"use model.channels >= {in_channels}, or initializer=orthogonal"
        )
    tap = torch.empty(out_channels, in_channels, dtype=tensor.dtype)
    nn.init.orthogonal_(tap, gain=gain, generator=args.generator)
    nn.init.zeros_(tensor)
    centre = tuple(k // 2 for k in tensor.shape[2:])
    tensor[(slice(None), slice(None), *centre)] = tap.to(tensor.device)


@INITIALIZERS.register("lsuv")
def _lsuv(tensor: Tensor, args: InitArgs) -> None:
    """LSUV's first step, orthonormal (gain 1: the data step sets the size) times scale.

    Alone this is ``orthogonal`` with gain 1; ``apply_init`` follows it with ``lsuv_normalize``.
    """
    _require_2d(tensor, "lsuv")
    nn.init.orthogonal_(tensor, gain=args.scale, generator=args.generator)


@INITIALIZERS.register("variance_scaling")
def _variance_scaling(tensor: Tensor, args: InitArgs) -> None:
    """Keras 3's VarianceScaling: Var = factor / n (n by mode), then our scale on the std."""
    cfg = args.cfg
    check_choice("initializer.distribution", cfg.distribution, DISTRIBUTIONS, "variance_scaling")
    n = _fan(tensor, cfg.mode, "variance_scaling", VARIANCE_MODES)
    _FILLS[cfg.distribution](tensor, math.sqrt(cfg.factor / n) * args.scale, args.generator)


@INITIALIZERS.register("identity")
def _identity(tensor: Tensor, args: InitArgs) -> None:
    """scale * I: IRNN's recurrent weights (Le et al. 2015). Not variance-based, so no gain.

    A conv kernel gets the conv's identity, a Dirac delta at the centre tap (channel i to channel i;
    PyTorch's ``dirac_``), so a stack of them passes its input through as a stack of I does.
    """
    _require_2d(tensor, "identity")
    if tensor.dim() == 2:
        nn.init.eye_(tensor)
    else:
        nn.init.dirac_(tensor)
    tensor.mul_(args.scale)


@INITIALIZERS.register("pretrained")
def _pretrained(tensor: Tensor, args: InitArgs) -> None:
    raise ConfigError("initializer=pretrained sets a whole model: use apply_init or load_pretrained")


# --- weights, biases, models -----------------------------------------------------------------------


def init_weight(
    weight: Tensor,
    cfg: InitializerConfig,
    scale: float,
    activation_gain: float,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Set one weight tensor in place with the scheme ``cfg.name``.

    Args:
        weight: A tensor in PyTorch's layout (out, in, *kernel).
        cfg: The initializer options.
        scale: Multiplies the std (or bound) the scheme gives.
        activation_gain: What ``cfg.gain == "auto"`` means.
        generator: Source of the random numbers (None: torch's global generator).
    """
    entry = INITIALIZERS.get(cfg.name)
    if weight.numel() == 0:  # no fans to divide by; torch's own initializers skip these too
        return
    with torch.no_grad():
        entry(weight, InitArgs(cfg, scale, activation_gain, generator))


def init_bias(bias: Tensor, cfg: InitializerConfig, fan_in: int, generator: Optional[torch.Generator] = None) -> None:
    """Set a bias in place by ``cfg.bias`` and ``cfg.bias_value`` (never multiplied by scale).

    Args:
        bias: A 1-D bias.
        cfg: ``bias`` is one of ``BIAS_INITIALIZERS``; ``bias_value`` is the constant's value, the
            normal's std or the uniform's bound.
        fan_in: The layer's fan_in (``torch_default`` draws from U(+-1/sqrt(fan_in)), as nn.Linear).
        generator: Source of the random numbers.
    """
    check_bias(cfg.bias)
    value = cfg.bias_value
    with torch.no_grad():
        if cfg.bias == "zeros":
            nn.init.zeros_(bias)
        elif cfg.bias == "constant":
            nn.init.constant_(bias, value)
        elif cfg.bias == "normal":
            nn.init.normal_(bias, 0.0, value, generator=generator)
        else:
            bound = value if cfg.bias == "uniform" else _torch_default_bound(fan_in)
            nn.init.uniform_(bias, -bound, bound, generator=generator)


def _torch_default_bound(fan_in: int) -> float:
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def apply_init(
    model: nn.Module,
    cfg: InitializerConfig,
    scale: float,
    activation_gain: float,
    generator: Optional[torch.Generator] = None,
    probe: Optional[Tensor] = None,
) -> None:
    """Initialize every Linear/Conv layer of ``model`` in place (or load pretrained weights).

    Layers are visited in ``model.modules()`` order, so one generator seed gives one model.

    Args:
        model: Any module; normalization layers in it keep their defaults.
        cfg: The initializer options (``cfg.name == "pretrained"``: see ``load_pretrained``).
        scale: Multiplies every weight's std (or bound); biases are not scaled.
        activation_gain: What ``cfg.gain == "auto"`` means.
        generator: Source of the random numbers.
        probe: A batch of training inputs on the model's device, (B, *input_shape); only the
            data-dependent schemes (``DATA_DEPENDENT``: ``lsuv``) read it, and they require it.

    Raises:
        ConfigError: A data-dependent scheme without a probe batch, or a weight the scheme refuses.
    """
    name = INITIALIZERS.canonical(cfg.name)
    if name == "pretrained":
        load_pretrained(model, cfg, scale)
        return
    data_step = DATA_DEPENDENT.get(name)
    if data_step is not None and probe is None:
        raise ConfigError(f"initializer={name} is data-dependent: apply_init needs a probe batch of training inputs")
    for module in model.modules():
        if isinstance(module, INIT_LAYERS):
            init_weight(module.weight, cfg, scale, activation_gain, generator)
            if module.bias is not None:
                fan_in = nn.init._calculate_fan_in_and_fan_out(module.weight)[0]
                init_bias(module.bias, cfg, fan_in, generator)
    if data_step is not None:
        data_step(model, probe, scale)


# --- data-dependent schemes ------------------------------------------------------------------------


class _Reached(Exception):
    """Raised by a forward hook to stop the forward pass once the measured layer has run."""


@torch.no_grad()
def lsuv_normalize(
    model: nn.Module, probe: Tensor, scale: float = 1.0, tol: float = LSUV_TOL, max_iter: int = LSUV_MAX_ITER
) -> list[float]:
    """LSUV's second step (Mishkin & Matas 2015): unit output variance per layer, first to last.

    For each Linear/Conv layer in the order the forward pass calls them (not ``model.modules()``
    order, which may list the head first), the head included, the weight is divided by the std of
    the layer's output on ``probe`` until ``|Var - 1| < tol`` or ``max_iter`` rescalings (with zero
    biases one rescaling is exact). Then every such weight is multiplied by ``scale``. The forward
    passes run in train mode (batch norm uses batch statistics, as in training); normalization
    buffers and the module's mode are restored. A layer whose output is constant (variance 0, or
    not finite) is left as it is, and so is a layer the forward pass never calls.

    Args:
        model: The model, its weights already orthonormal (the ``lsuv`` entry).
        probe: Training inputs, (B, *input_shape).
        scale: Multiplies every weight after the normalization.
        tol: Tolerance on the output variance.
        max_iter: Most rescalings per layer.

    Returns:
        Each layer's output variance on ``probe`` after its normalization, before ``scale``.
    """
    variances = []
    with probing(model):
        layers = _forward_order(model, probe)
        for layer in layers:
            var = _output_variance(model, layer, probe)
            for _ in range(max_iter):
                if abs(var - 1.0) < tol or not math.isfinite(var) or var <= 0.0:
                    break
                layer.weight.div_(math.sqrt(var))
                var = _output_variance(model, layer, probe)
            variances.append(var)
    if scale != 1:
        for layer in layers:
            layer.weight.mul_(scale)
    return variances


def _forward_order(model: nn.Module, probe: Tensor) -> list[nn.Module]:
    """The Linear/Conv layers of ``model`` in the order one forward pass on ``probe`` calls them."""
    called: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda module, inputs, output: called.append(module))
        for m in model.modules()
        if isinstance(m, INIT_LAYERS)
    ]
    try:
        model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(called))  # first call of each, in order


def _output_variance(model: nn.Module, layer: nn.Module, probe: Tensor) -> float:
    """Var of ``layer``'s output over the whole (B, C, *positions) output; the forward stops there."""
    seen: list[Tensor] = []

    def hook(module, inputs, output):
        seen.append(output)
        raise _Reached

    handle = layer.register_forward_hook(hook)
    try:
        model(probe)
    except _Reached:
        pass
    finally:
        handle.remove()
    return float(seen[0].double().var())


#: canonical name -> the model-level step that follows the per-tensor entries: (model, probe, scale).
#: These schemes need a probe batch (``apply_init(..., probe=x)``).
DATA_DEPENDENT: dict[str, Callable[[nn.Module, Tensor, float], object]] = {"lsuv": lsuv_normalize}


# --- pretrained starts ------------------------------------------------------------


def load_pretrained(model: nn.Module, cfg: InitializerConfig, scale: float) -> None:
    """Load weights from ``cfg.path`` into ``model``, strictly (a run's weights were fetched to it).

    Parameters under a prefix of ``cfg.exclude`` (matched by dotted components: ``head`` matches
    ``head.weight``, not ``header.weight``) are neither loaded nor required and keep the values the
    model was built with. Afterwards the loaded Linear/Conv weights are multiplied by ``scale``.

    Raises:
        ConfigError: Missing or unexpected keys, or a shape mismatch (the first offenders named).
    """
    path = _pretrained_path(cfg)
    state = _without(load_weights_file(path), cfg.exclude)
    _check_fits(_without(model.state_dict(), cfg.exclude), state, path)
    model.load_state_dict(state, strict=False)  # strict=False only because excluded keys are absent
    if scale != 1:
        _scale_loaded_weights(model, scale, set(state))


def _pretrained_path(cfg: InitializerConfig) -> Path:
    check_pretrained_source(cfg)
    if cfg.path is None:
        # The engine never reads MLflow: the record layer fetches a run's weights to a local file
        # with the trial's tracking URI (pipeline/record/runner.py) before the engine starts.
        raise ConfigError(
            f"initializer.run_id={cfg.run_id} names an MLflow run; the engine alone loads initializer.path "
            "(the trial, run and reproduce commands fetch a run's weights first)"
        )
    return Path(cfg.path)


def _without(state: Mapping[str, Tensor], prefixes: list[str]) -> dict[str, Tensor]:
    return {key: value for key, value in state.items() if not _excluded(key, prefixes)}


def _excluded(key: str, prefixes: list[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in prefixes)


def _check_fits(own: Mapping[str, Tensor], loaded: Mapping[str, Tensor], path: Path) -> None:
    mismatched = [k for k in own if k in loaded and own[k].shape != loaded[k].shape]
    shapes = [f"{k} model {tuple(own[k].shape)} vs file {tuple(loaded[k].shape)}" for k in mismatched]
    problems = [
        _listing("missing keys", [k for k in own if k not in loaded]),
        _listing("unexpected keys", [k for k in loaded if k not in own]),
        _listing("shape mismatch", shapes),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(
            f"pretrained weights {path} do not fit the model: {'; '.join(problems)} "
            "(initializer.exclude lists parameter prefixes to leave as built)"
        )


def _listing(what: str, items: list[str], first: int = 3) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - first} more)" if len(items) > first else ""
    return f"{what}: {', '.join(items[:first])}{more}"


@torch.no_grad()
def _scale_loaded_weights(model: nn.Module, scale: float, loaded: set[str]) -> None:
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, INIT_LAYERS) and key in loaded:
            module.weight.mul_(scale)
