"""Run configuration: typed dataclasses, YAML + dotted overrides, validation before launch."""

from rspo_mega.config.loader import (
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    save_config,
)
from rspo_mega.config.schema import (
    AlgorithmConfig,
    CheckpointConfig,
    DataConfig,
    FP8Config,
    LikelihoodConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
)
from rspo_mega.config.validate import Layout, validate_config
from rspo_mega.errors import ConfigError

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "ConfigError", "DataConfig", "FP8Config", "Layout",
    "LikelihoodConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig",
    "RolloutConfig", "TrainConfig", "config_from_dict", "config_to_dict", "dump_config",
    "load_config", "save_config", "validate_config",
]
