"""Typed configuration: schema (dataclasses), YAML loading with overrides, validation, path helpers.

    cfg = load_config("configs/inference.yaml", ["inference.sampling_steps=2"])
    ckpt = resolve_generator_weights(cfg)      # errors on placeholders / missing files / no weights
"""
from longlive.config.errors import ConfigError
from longlive.config.load import (
    FLAT_KEYS,
    LEGACY_KEYS,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from longlive.config.paths import (
    check_generator_checkpoint,
    is_merged_checkpoint_format,
    is_placeholder,
    peek_checkpoint_format,
    require_path,
    resolve_generator_weights,
)
from longlive.config.schema import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_SCENE_CUT_PREFIX,
    MERGED_CHECKPOINT_FORMATS,
    AdapterConfig,
    AlgorithmConfig,
    CheckpointsConfig,
    Config,
    DataConfig,
    ErrorRecyclingConfig,
    EvaluationConfig,
    InferenceConfig,
    InfraConfig,
    LoggingConfig,
    ModelKwargs,
    TrainingConfig,
)
from longlive.config.validate import validate_config

__all__ = [
    "AdapterConfig",
    "AlgorithmConfig",
    "CheckpointsConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_SCENE_CUT_PREFIX",
    "ErrorRecyclingConfig",
    "EvaluationConfig",
    "FLAT_KEYS",
    "InferenceConfig",
    "InfraConfig",
    "LEGACY_KEYS",
    "LoggingConfig",
    "MERGED_CHECKPOINT_FORMATS",
    "ModelKwargs",
    "TrainingConfig",
    "check_generator_checkpoint",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "is_merged_checkpoint_format",
    "is_placeholder",
    "load_config",
    "parse_override",
    "peek_checkpoint_format",
    "require_path",
    "resolve_generator_weights",
    "validate_config",
]
