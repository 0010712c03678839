"""Converted-model classes (config, GSA attention, cache), registered with transformers' Auto classes on import.
These files also travel with saved checkpoints."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache_t2r import GSACache, GSAStateLayer
from .configuration_t2r import T2R_CONFIGS, GSASettings
from .modeling_t2r import T2R_MODELS, GSAAttention

for _config_cls in T2R_CONFIGS.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
for _config_cls, _model_cls in T2R_MODELS.items():
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)

__all__ = ["T2R_CONFIGS", "T2R_MODELS", "GSAAttention", "GSACache", "GSASettings", "GSAStateLayer"]
