"""What a config may name and set, known without importing PyTorch.

Every registry's names and aliases are declared here (``Registry.declare``); the modules that
implement them (pipeline/engine/nn/, data.py, optim.py) register exactly these names, and ``get``
imports them on first use. The checks of the initializer's and the dataset's options, and
maxout's widening of the layer before it, live here too. So a study's driver validates every
trial's config, and groups trials for batching, without PyTorch, which it never imports (1.5 s
before Ray could start).

Adding an initializer (or an activation, a dataset...): declare its name here, register its
implementation under that name, add its YAML file to conf/ (docs/initializers.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from pipeline.config.errors import ConfigError
from pipeline.config.registry import Registry
from pipeline.config.schema import PROBE_SCHEDULES, ActivationConfig, Config, DatasetConfig, InitializerConfig

INITIALIZERS: Registry = Registry("initializer", "pipeline.engine.nn.initializers")
ACTIVATIONS: Registry = Registry("activation", "pipeline.engine.nn.activations")
NORMALIZATIONS: Registry = Registry("normalization", "pipeline.engine.nn.norms")
MODELS: Registry = Registry("model", "pipeline.engine.nn.models")
DATASETS: Registry = Registry("dataset", "pipeline.engine.data")
OPTIMIZERS: Registry = Registry("optimizer", "pipeline.engine.optim")

for _name, *_aliases in (
    ("zeros",),
    ("constant",),
    ("normal",),
    ("uniform",),
    ("xavier_uniform", "glorot_uniform"),
    ("xavier_normal", "glorot_normal"),
    ("kaiming_uniform", "he_uniform"),
    ("kaiming_normal", "he_normal"),
    ("lecun_uniform",),
    ("lecun_normal",),
    ("orthogonal",),
    ("delta_orthogonal",),
    ("lsuv",),
    ("variance_scaling",),
    ("identity",),
    ("pretrained",),
):
    INITIALIZERS.declare(_name, *_aliases)
for _name, *_aliases in (
    ("identity", "linear"),
    ("sigmoid",),
    ("tanh",),
    ("relu",),
    ("leaky_relu",),
    ("selu",),
    ("elu",),
    ("relu6",),
    ("gelu",),
    ("silu", "swish"),
    ("softplus",),
    ("maxout",),
):
    ACTIVATIONS.declare(_name, *_aliases)
for _registry, _names in (
    (NORMALIZATIONS, ("none", "batch", "layer", "group")),
    (MODELS, ("mlp", "cnn", "rnn", "gru", "resnet")),
    (DATASETS, ("digits", "mnist1d", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")),
    (OPTIMIZERS, ("sgd", "adam", "lars")),
):
    for _name in _names:
        _registry.declare(_name)
del _name, _aliases, _registry, _names

#: The schemes a bias can use (a bias is 1-D: it has no fans and cannot be orthogonal).
BIAS_INITIALIZERS = ("zeros", "constant", "normal", "uniform", "torch_default")
KAIMING_MODES = ("fan_in", "fan_out")
VARIANCE_MODES = ("fan_in", "fan_out", "fan_avg")
DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")
INPUT_NORMS = ("none", "zscore", "minmax", "channel")
#: ``model.residual_init``: how a ResNet's blocks start (pipeline/engine/nn/resnet.py).
RESIDUAL_INITS = ("none", "zero_gamma", "fixup", "skipinit")
#: ``model.parametrization``: how an MLP's layers scale with width (pipeline/engine/nn/models.py).
PARAMETRIZATIONS = ("standard", "ntk", "mup")
#: The optimizers whose per-layer learning rates a parametrization other than standard sets.
PARAMETRIZED_OPTIMIZERS = ("sgd", "adam")


def validate(cfg: Config) -> None:
    """Every value of ``cfg`` that its types cannot check: its numbers, every name and the options
    their entries read. Raises ``ConfigError`` naming the first bad value, before any work starts."""
    check_numbers(cfg)
    cfg.initializer.name = INITIALIZERS.canonical(cfg.initializer.name)
    validate_initializer(cfg)
    activation_widening(cfg.activation)  # checks the activation's name, and maxout's pieces
    NORMALIZATIONS.canonical(cfg.normalization.name)
    validate_model(cfg)
    validate_dataset(cfg.dataset)
    OPTIMIZERS.canonical(cfg.optimizer.name)
    check_study_name(cfg.study.name)


#: A study's name names its MLflow experiment, its Optuna study and its folder under
#: ``study.output_dir``: a name, never a path (no ``/``, no ``..``, no leading dot).
MAX_WRITERS = 16  # study.writers: more would only queue on the store's one write lock
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_model(cfg: Config) -> None:
    """The model's name, the options only a ResNet reads (its depth is checked when it is built) and
    the parametrization (an MLP's)."""
    name = MODELS.canonical(cfg.model.name)
    check_choice("model.residual_init", cfg.model.residual_init, RESIDUAL_INITS)
    check_positive("model.width_multiplier", cfg.model.width_multiplier)
    if cfg.model.residual_init != "none" and name != "resnet":
        raise ConfigError(
            f"model.residual_init={cfg.model.residual_init} is for model=resnet; model={name} takes residual_init=none"
        )
    _check_parametrization(cfg, name)


def _check_parametrization(cfg: Config, model: str) -> None:
    """ntk and mup rescale an MLP's layers and its optimizer's per-layer learning rates (SGD, Adam)."""
    parametrization = cfg.model.parametrization
    check_choice("model.parametrization", parametrization, PARAMETRIZATIONS)
    check_positive("model.base_width", cfg.model.base_width)
    if parametrization == "standard":
        return
    if model != "mlp":
        raise ConfigError(f"model.parametrization={parametrization} is for model=mlp; model={model} takes standard")
    optimizer = OPTIMIZERS.canonical(cfg.optimizer.name)
    if optimizer not in PARAMETRIZED_OPTIMIZERS:
        raise ConfigError(
            f"model.parametrization={parametrization} sets per-layer learning rates for optimizer="
            f"{'|'.join(PARAMETRIZED_OPTIMIZERS)}; optimizer={optimizer} takes standard"
        )


def check_study_name(name: str) -> None:
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise ConfigError(
            f"study.name={name!r} is invalid; a study name is a name, not a path: up to 128 letters, digits, "
            "'.', '_' or '-', starting with a letter or a digit"
        )


def check_numbers(cfg: Config) -> None:
    """The numbers that must be positive (or in their set), whatever the groups chosen."""
    for key in (
        "scale",
        "batch_size",
        "train.epochs",
        "optimizer.lr",
        "model.depth",
        "model.width",
        "train.probe_size",
        "study.trial_batch_max",
    ):
        check_positive(key, _dotted(cfg, key))
    if cfg.train.probe_schedule not in PROBE_SCHEDULES:
        raise ConfigError(
            f"train.probe_schedule={cfg.train.probe_schedule!r} is invalid; valid: {', '.join(PROBE_SCHEDULES)}"
        )
    if cfg.train.grad_clip is not None:
        check_positive("train.grad_clip", cfg.train.grad_clip)
    check_range("optimizer.momentum", cfg.optimizer.momentum, 0, 1, "[0, 1)")
    check_range("optimizer.weight_decay", cfg.optimizer.weight_decay, 0, math.inf, ">= 0")
    check_positive("optimizer.trust_coefficient", cfg.optimizer.trust_coefficient)
    if cfg.study.writers is not None:
        check_range(
            "study.writers",
            cfg.study.writers,
            0,
            MAX_WRITERS + 1,
            f"[0, {MAX_WRITERS}] (or null: chosen by the study's size)",
        )


def _dotted(cfg: Config, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def activation_widening(cfg: ActivationConfig) -> int:
    """How many times wider the layer feeding this activation must be (maxout: ``pieces``)."""
    if ACTIVATIONS.canonical(cfg.name) != "maxout":
        return 1
    if cfg.pieces < 1:
        raise ConfigError(f"activation.pieces={cfg.pieces} is invalid; it must be >= 1")
    return cfg.pieces


# --- the initializer's options -------------------------------------------------------------------


def validate_initializer(cfg: Config) -> None:
    """Check ``cfg.initializer`` before any work starts.

    Only the options the chosen scheme reads are checked (a default ``std`` does not matter to
    ``orthogonal``); ``gain`` and the bias always are.

    Raises:
        ConfigError: One line naming the bad value and the valid ones.
    """
    init = cfg.initializer
    name = INITIALIZERS.canonical(init.name)
    for check in _SCHEME_CHECKS.get(name, ()):
        check(init, name)
    _check_gain(init.gain)
    check_bias(init.bias)
    _check_recurrent(init.recurrent)
    if init.bias in ("normal", "uniform"):
        check_positive(f"initializer.bias_value (bias={init.bias})", init.bias_value)
    check_finite("initializer.bias_value", init.bias_value)
    check_finite("initializer.value", init.value)


def _check_recurrent(name: Optional[str]) -> None:
    if name is None:
        return
    valid = [n for n in INITIALIZERS.names() if n != "pretrained"]
    if name not in INITIALIZERS or INITIALIZERS.canonical(name) == "pretrained":
        raise ConfigError(
            f"initializer.recurrent={name} is invalid; valid: {', '.join(valid)} (or null: same as initializer)"
        )


def check_choice(key: str, value: str, valid: tuple[str, ...], name: str = "") -> None:
    """``value`` is one of ``valid`` (``name``: the entry whose option this is, for the message)."""
    if value not in valid:
        where = f" for {name}" if name else ""
        raise ConfigError(f"{key}={value} is invalid{where}; valid: {', '.join(valid)}")


def check_positive(key: str, value: float) -> None:
    """The one positivity check of every config number: finite and > 0."""
    check_finite(key, value)
    if not value > 0:
        raise ConfigError(f"{key}={value} is invalid; it must be > 0")


def check_finite(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value} is invalid; it must be a finite number")


def check_range(key: str, value: float, low: float, high: float, meaning: str) -> None:
    """``low <= value < high``, finite; ``meaning`` says the range in the message."""
    check_finite(key, value)
    if not low <= value < high:
        raise ConfigError(f"{key}={value} is invalid; it must be in {meaning}")


def _check_gain(gain: object) -> None:
    if gain == "auto":
        return
    try:
        value = float(gain) if not isinstance(gain, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"initializer.gain={gain} is invalid; valid: auto or a finite number > 0")


def check_bias(name: str) -> None:
    if name in BIAS_INITIALIZERS:
        return
    reason = ""
    if name in INITIALIZERS and INITIALIZERS.canonical(name) == "pretrained":
        reason = ": pretrained loads whole models, biases included"
    elif name in INITIALIZERS:
        reason = f": {name} needs a tensor of at least 2 dimensions and a bias is 1-D"
    raise ConfigError(f"initializer.bias={name} is invalid{reason}; valid: {', '.join(BIAS_INITIALIZERS)}")


def _check_kaiming(cfg: InitializerConfig, name: str) -> None:
    check_choice("initializer.mode", cfg.mode, KAIMING_MODES, name)


def _check_variance_scaling(cfg: InitializerConfig, name: str) -> None:
    check_choice("initializer.mode", cfg.mode, VARIANCE_MODES, name)
    check_choice("initializer.distribution", cfg.distribution, DISTRIBUTIONS, name)
    check_positive("initializer.factor", cfg.factor)


def check_pretrained_source(cfg: InitializerConfig) -> None:
    given = [key for key in ("path", "run_id") if getattr(cfg, key) is not None]
    if len(given) != 1:
        got = "both" if given else "neither"
        raise ConfigError(
            f"initializer=pretrained needs exactly one of initializer.path or initializer.run_id; got {got}"
        )


def _check_pretrained(cfg: InitializerConfig, name: str) -> None:
    check_pretrained_source(cfg)
    if cfg.path is not None and not Path(cfg.path).is_file():
        raise ConfigError(f"initializer.path={cfg.path} does not exist (initializer=pretrained needs a weights file)")


#: canonical name -> the checks of the options that scheme reads
_SCHEME_CHECKS: dict[str, tuple[Callable[[InitializerConfig, str], None], ...]] = {
    "normal": (lambda cfg, name: check_positive("initializer.std", cfg.std),),
    "uniform": (lambda cfg, name: check_positive("initializer.bound", cfg.bound),),
    "kaiming_uniform": (_check_kaiming,),
    "kaiming_normal": (_check_kaiming,),
    "variance_scaling": (_check_variance_scaling,),
    "pretrained": (_check_pretrained,),
}


# --- the dataset's options --------------------------------------------------------------------


def validate_dataset(cfg: DatasetConfig) -> None:
    """Check every dataset value that needs no file access; raise ``ConfigError`` on the first bad one."""
    name = DATASETS.canonical(cfg.name)
    if cfg.input_norm not in INPUT_NORMS:
        raise ConfigError(f"dataset.input_norm={cfg.input_norm} is invalid; valid: {', '.join(INPUT_NORMS)}")
    for key in ("val_fraction", "test_fraction"):
        if not 0 < getattr(cfg, key) < 1:
            raise ConfigError(f"dataset.{key}={getattr(cfg, key)} is invalid; it must be in (0, 1)")
    if cfg.max_train is not None and cfg.max_train < 1:
        raise ConfigError(f"dataset.max_train={cfg.max_train} is invalid; it must be >= 1 (or null for all)")
    if cfg.classes is not None:
        _check_classes(list(cfg.classes))
    if name == "synthetic":
        _check_synthetic(cfg)


def _check_classes(classes: list[int]) -> None:
    if len(classes) < 2 or len(set(classes)) != len(classes) or min(classes) < 0:
        raise ConfigError(
            f"dataset.classes={classes} is invalid; give at least two distinct labels >= 0 (or null for all)"
        )


def _check_synthetic(cfg: DatasetConfig) -> None:
    if not 0 <= cfg.difficulty <= 1:
        raise ConfigError(f"dataset.difficulty={cfg.difficulty} is invalid; it must be in [0, 1]")
    for key in ("n_samples", "n_features", "n_classes"):
        if getattr(cfg, key) < (2 if key == "n_classes" else 1):
            raise ConfigError(f"dataset.{key}={getattr(cfg, key)} is too small")
    if informative_features(cfg.n_features, cfg.n_classes) > cfg.n_features:
        raise ConfigError(
            f"dataset.n_features={cfg.n_features} is too small for {cfg.n_classes} classes; "
            f"need >= {math.ceil(math.log2(2 * cfg.n_classes))}"
        )


def informative_features(n_features: int, n_classes: int) -> int:
    """Half the features carry signal, at least enough hypercube vertices for 2 clusters per class."""
    return max(math.ceil(math.log2(2 * n_classes)), n_features // 2)
