"""Registers the converted architectures with transformers' Auto classes (on import; ``import t2r`` does it)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_t2r import T2R_CONFIGS
from .modeling_t2r import T2R_MODELS

for _config_cls in T2R_CONFIGS.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
for _config_cls, _model_cls in T2R_MODELS.items():
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)
