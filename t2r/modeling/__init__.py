"""Converted-model classes (config, GSA attention, cache). These files also travel with saved checkpoints."""

from .cache_t2r import GSACache, GSAStateLayer
from .configuration_t2r import T2R_CONFIGS, GSASettings
from .modeling_t2r import T2R_MODELS, GSAAttention

__all__ = ["T2R_CONFIGS", "T2R_MODELS", "GSAAttention", "GSACache", "GSASettings", "GSAStateLayer"]
