"""Typed schemas for every config group, and the conversion of a plain dict to a typed ``Config``.

Hydra composes ``conf/`` against these dataclasses (each stored as ``base_<group>``, which the YAML
files of that group list first in their defaults), so a misspelt key fails at composition. What
types cannot say (a name must be registered, a scale must be positive) the catalog checks
(pipeline/config/catalog.py ``validate``), before any data is loaded, any Ray task is sent or any
MLflow run is opened.

Workers never see Hydra: a trial travels as the plain dict of its resolved config, and
``config_from_dict`` turns it back into a typed ``Config``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from pipeline.config.errors import ConfigError, one_line

#: The five study axes: one name each, as CLI override, config key, Optuna param and MLflow param.
AXES = ("initializer", "scale", "activation", "normalization", "batch_size")


@dataclass
class InitializerConfig:
    """How every Linear/Conv weight (and bias) of the model is set before training.

    ``scale`` (top level) multiplies the standard deviation or bound the scheme would give; the
    fields here are the scheme's own options, each used only by the schemes that name it.
    """

    name: str = "kaiming_normal"
    gain: Any = "auto"  # "auto": the activation's gain (pipeline/engine/nn/activations.py), or a number
    mode: str = "fan_in"  # kaiming / variance_scaling: fan_in | fan_out (| fan_avg)
    std: float = 0.01  # normal
    bound: float = 0.05  # uniform
    value: float = 0.0  # constant
    factor: float = 1.0  # variance_scaling: Keras's own variance factor ("scale" in Keras)
    distribution: str = "truncated_normal"  # variance_scaling: normal | truncated_normal | uniform
    path: Optional[str] = None  # pretrained: a .safetensors file or a torch state dict
    run_id: Optional[str] = None  # pretrained: an MLflow run whose final weights to start from
    exclude: list[str] = field(default_factory=list)  # pretrained: parameter prefixes left as built
    recurrent: Optional[str] = None  # rnn/gru hidden-to-hidden weights (per gate); null: same as `name`
    bias: str = "zeros"  # zeros | constant | normal | uniform | torch_default
    bias_value: float = 0.0  # constant: the value; normal: the std; uniform: the bound


@dataclass
class ActivationConfig:
    name: str = "relu"
    slope: float = 0.01  # leaky_relu's negative slope
    pieces: int = 2  # maxout: units per output (the layer before it is this many times wider)


@dataclass
class NormalizationConfig:
    name: str = "none"  # none | batch | layer | group
    groups: int = 8  # group norm only


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | cnn | rnn | gru | resnet
    depth: int = 4  # hidden layers (mlp), conv blocks (cnn), stacked recurrent layers (rnn/gru), 6n+2 (resnet)
    width: int = 128  # hidden units (mlp, rnn/gru)
    residual: bool = False  # mlp: h <- h + block(h) on width->width layers
    features_per_step: Optional[int] = None  # rnn/gru: input features read per time step (default: one column/row)
    channels: int = 32  # cnn
    kernel_size: int = 3  # cnn
    width_multiplier: float = 1.0  # resnet: stage channels 16/32/64 times this
    residual_init: str = "none"  # resnet: none | zero_gamma | fixup | skipinit
    parametrization: str = "standard"  # mlp: standard | ntk | mup (docs/initializers.md)
    base_width: int = 64  # mlp, mup: the width whose learning rates muP transfers (r = width / base_width)


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: Optional[str] = None  # file datasets: their directory (null: $INITSTUDY_DATA/<name>, else ~/.cache)
    augment: bool = False  # images: random crop (4-pixel padding) and horizontal flip, in batch on the device
    download: bool = True  # file datasets: fetch missing files (verified) into that directory; false: only read
    input_norm: str = "zscore"  # none | zscore | minmax | channel (per-channel zscore), fitted on the training split
    val_fraction: float = 0.2
    test_fraction: float = 0.2  # datasets without their own test split
    split_seed: int = 0  # the split stays fixed across trials, whatever the trial's seed
    max_train: Optional[int] = None  # keep at most this many training samples
    classes: Optional[list[int]] = None  # keep only these classes (relabelled 0..k-1)
    n_samples: int = 2000  # synthetic
    n_features: int = 32  # synthetic
    n_classes: int = 4  # synthetic
    difficulty: float = 0.5  # synthetic: 0 easy .. 1 hard (class separation shrinks)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | lars
    lr: float = 0.05
    momentum: float = 0.9  # sgd/lars momentum; adam's beta1
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001  # lars: eta in local_lr = eta * ||w|| / (||g|| + wd * ||w||)


PROBE_SCHEDULES = ("log", "every")


@dataclass
class TrainConfig:
    epochs: int = 10
    grad_clip: Optional[float] = None  # max global gradient norm, none by default
    target_accuracy: float = 0.9  # epochs_to_target counts epochs until val_accuracy >= this
    probe_size: int = 256  # diagnostics run on this fixed batch of training samples
    diagnostics: bool = True
    probe_schedule: str = "log"  # log: epochs 0, 1, 2, 4, 8, ... and the last | every: every epoch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch intra-op threads; default: what Ray gave the trial


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///runs/mlflow.db"  # any MLflow tracking URI
    artifact_root: str = "runs/artifacts"  # local artifact store of new experiments (sqlite stores)
    experiment: str = "initstudy-trials"  # experiment of single `trial` runs
    log_weights: bool = True
    layer_plot: bool = (
        True  # diagnostics/signal_by_depth.png per trial (~0.45 s on 2 CPUs; a study sets study.trial_plots)
    )


@dataclass
class StudyConfig:
    """The ``run`` command: how Optuna chooses trials and how many."""

    name: str = "initstudy-default"  # also the MLflow experiment and the Optuna study name
    n_trials: Optional[int] = 24  # None: the grid size (grid sampler)
    sampler: str = "tpe"  # tpe | random | qmc | grid | nsga2
    pruner: str = "none"  # none | median | successive_halving | hyperband
    objectives: list[str] = field(default_factory=lambda: ["val_accuracy"])
    seeds: int = 1  # each sampled configuration runs with seeds seed, seed+1, ...; objective = mean
    seed: int = 0  # the sampler's seed (a study re-run gives the same trials in the same order)
    storage: Optional[str] = None  # an Optuna RDB URL or a *.journal file; default output_dir/<name>/optuna.journal
    output_dir: str = "runs/studies"
    max_failure_rate: float = 0.5  # stop the study once more than this share of trials failed
    min_trials_for_failure_rate: int = 4
    retries: int = 1  # re-runs of a trial whose worker process died
    report: bool = True  # build the study report at the end
    trial_plots: bool = False  # each trial's own depth plot (the report plots depth per initializer)
    # Critical scale per activation, an override (e.g. {tanh: 1.0}): the report computes each from the
    # trials' mean-field predictions (theory_*) and marks it beside the best; a value set here replaces it.
    reference_scales: dict[str, float] = field(default_factory=dict)
    progress: bool = True
    # Trials that share an architecture and batch size (pipeline/engine/batched.py) train together as one
    # vectorized model, up to trial_batch_max per Ray task; each keeps its own run and Optuna trial.
    trial_batching: bool = True
    trial_batch_max: int = 32
    # Processes that write the trials' MLflow runs beside the driver (pipeline/record/writers.py);
    # 0: the driver writes them itself. null: 0 for a study under 100 trials (a writer's start-up
    # costs more than it saves there), else half the driver's cores, at least 1 and at most 4.
    writers: Optional[int] = None


@dataclass
class ClusterConfig:
    """Where trials run: a local Ray instance (address null) or an existing cluster."""

    address: Optional[str] = None  # null: start a local Ray; "auto" or "host:port": join a cluster
    num_cpus: Optional[int] = None  # local instance size; default: every core
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions let several small trials share one GPU
    max_concurrent: Optional[int] = None  # default: what the cluster's resources allow


@dataclass
class Config:
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scale: float = 1.0
    batch_size: int = 64
    seed: int = 0
    study: StudyConfig = field(default_factory=StudyConfig)  # `run` only; a trial ignores it
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    space: Any = None  # `run` only: config key -> sweep expression (pipeline/study/space.py)


GROUP_SCHEMAS = {
    "initializer": InitializerConfig,
    "activation": ActivationConfig,
    "normalization": NormalizationConfig,
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "tracking": TrackingConfig,
    "study": StudyConfig,
    "cluster": ClusterConfig,
}


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (``base_config`` and ``base_<group>``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name=f"base_{group}", node=schema)


def config_from_dict(data: dict) -> Config:
    """A typed ``Config`` from a resolved plain dict (a trial as it travels to a worker).

    A dict whose every value already has its field's type (what ``compose`` gives) is built
    directly (~0.1 ms); anything else goes through OmegaConf, which converts what it can and
    names the bad key otherwise (~40 ms, a large share of a tiny trial's overhead).
    """
    built = _built_directly(Config, data)
    if built is not None:
        return built
    try:
        merged = OmegaConf.merge(_schema(), data)  # merge copies the schema; it stays pristine
        return OmegaConf.to_object(merged)
    except Exception as err:  # omegaconf's errors carry the key path; keep them on one line
        raise ConfigError(one_line(err)) from err


def _built_directly(schema: type, data: Any) -> Any:
    """``schema(**data)`` with nested dataclasses built the same way; None where a key is unknown
    or a value's type is not exactly its field's (OmegaConf then decides)."""
    if not isinstance(data, dict):
        return None
    hints = _field_types(schema)
    if not set(data) <= hints.keys():
        return None
    values = {}
    for key, value in data.items():
        value = _typed(hints[key], value)
        if value is _REFUSED:
            return None
        values[key] = value
    return schema(**values)


_REFUSED = object()


def _typed(hint: Any, value: Any) -> Any:
    """``value`` if it fits ``hint`` as it is (int for float allowed), else ``_REFUSED``."""
    if dataclasses.is_dataclass(hint):
        return _built_directly(hint, value) or _REFUSED
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return copy.deepcopy(value)
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _typed(next(a for a in args if a is not type(None)), value)
    if origin in (list, dict):
        return _container(origin, args[-1] if args else Any, value)
    if hint is float and type(value) is int:
        return float(value)
    return value if type(value) is hint else _REFUSED


def _container(origin: type, item_hint: Any, value: Any) -> Any:
    """A new list/dict whose items fit ``item_hint``, or ``_REFUSED``."""
    if not isinstance(value, origin):
        return _REFUSED
    pairs = value.items() if origin is dict else enumerate(value)
    items = {key: _typed(item_hint, item) for key, item in pairs}
    if any(item is _REFUSED for item in items.values()):
        return _REFUSED
    return items if origin is dict else list(items.values())


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


@functools.lru_cache(maxsize=1)
def _schema():
    # Building the structured config from the dataclasses costs more than copying it.
    return OmegaConf.structured(Config)


def config_to_dict(cfg: Config) -> dict:
    # The fields hold plain values (interpolations were resolved by ``config_from_dict``), so
    # ``asdict`` gives what ``OmegaConf.to_container(OmegaConf.structured(cfg))`` gives, 100x faster.
    return dataclasses.asdict(cfg)
