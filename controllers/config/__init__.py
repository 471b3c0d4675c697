"""The recipe: one typed schema (``recipe``), loaded from YAML (``load``), checked before any
actor starts (``validate``); ``schema`` builds dataclasses from plain data with errors naming the key."""
from .load import dump, joins_cluster, load_recipe, recipe_dict, resolve_recipe_path
from .recipe import (
    EVAL_TASKS,
    OPENR1_SYSTEM_PROMPT,
    PACKAGE_DIR,
    STAGE_TYPES,
    TINY,
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    EvalSamplingConfig,
    EvalTaskConfig,
    GeneratorGroupConfig,
    GrpoConfig,
    LearnerGroupConfig,
    ModelConfig,
    RayConfig,
    Recipe,
    ReferenceConfig,
    SftConfig,
    StageConfig,
    StorageConfig,
)
from .schema import ConfigError
from .validate import (
    check_resources,
    check_teacher_tokenizer,
    env_secret,
    judge_keys,
    validate,
    validate_distill,
    validate_eval,
    validate_loss,
)

__all__ = ["EVAL_TASKS", "OPENR1_SYSTEM_PROMPT", "PACKAGE_DIR", "STAGE_TYPES", "TINY", "CheckpointConfig", "ConfigError",
           "DataConfig", "DistillConfig", "EvalConfig", "EvalSamplingConfig", "EvalTaskConfig", "GeneratorGroupConfig",
           "GrpoConfig", "LearnerGroupConfig", "ModelConfig", "RayConfig", "Recipe", "ReferenceConfig", "SftConfig",
           "StageConfig", "StorageConfig", "check_resources", "check_teacher_tokenizer", "dump", "env_secret",
           "judge_keys", "joins_cluster", "load_recipe", "recipe_dict", "resolve_recipe_path", "validate", "validate_distill", "validate_eval", "validate_loss"]
