"""The config layer: typed schemas, the catalog of every name with all validation, the registries,
and Hydra's composition (with its on-disk cache).

The bottom layer: it imports no other layer of ours, nor PyTorch, Ray, MLflow or Optuna, so a
study's driver checks every trial's config without them. Bad input anywhere is a ``ConfigError``.
"""

from pipeline.config.catalog import check_numbers, validate
from pipeline.config.compose_cache import user_cache_dir
from pipeline.config.composition import compose, group_options
from pipeline.config.errors import ConfigError, one_line
from pipeline.config.schema import (
    AXES,
    ActivationConfig,
    ClusterConfig,
    Config,
    DatasetConfig,
    InitializerConfig,
    ModelConfig,
    NormalizationConfig,
    OptimizerConfig,
    StudyConfig,
    TrackingConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)

__all__ = [
    "AXES",
    "ActivationConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "InitializerConfig",
    "ModelConfig",
    "NormalizationConfig",
    "OptimizerConfig",
    "StudyConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_numbers",
    "compose",
    "config_from_dict",
    "config_to_dict",
    "group_options",
    "one_line",
    "user_cache_dir",
    "validate",
]
