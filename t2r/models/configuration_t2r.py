"""Configs of converted models: the teacher architecture's own config plus the GSA settings.

Each class subclasses the teacher's config class, so every teacher field (and its validation) is kept and a
converted checkpoint's config.json is the teacher's plus ``gsa_*`` keys and a new ``model_type``.
This file is copied next to exported weights (trust_remote_code), so it imports only transformers and settings.py.
"""

import copy
import dataclasses
from dataclasses import dataclass

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from .settings import FEATURE_MAPS, GSA_FIELDS, GSASettings

__all__ = ["FEATURE_MAPS", "T2R_CONFIGS", "GSAConfigMixin", "gsa_settings"]


class GSAConfigMixin:
    """The ``gsa_<name>`` fields of every converted architecture's config, one per field of
    :class:`settings.GSASettings` (added below, so that the settings are declared once)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        try:
            gsa_settings(self).check_gsa(self.num_hidden_layers, label=lambda name: f"gsa_{name}")
        except ValueError as e:  # keep transformers' error type, with our message
            raise ValueError(str(e)) from None

    def is_gsa_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.gsa_full_attention_layers

    @property
    def attention_head_dim(self) -> int:
        """Per-head width of q/k/v (Qwen2's config has no head_dim field)."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads


GSAConfigMixin.__annotations__ = {}
for _f in dataclasses.fields(GSASettings):
    _g = copy.copy(_f)
    _g.name = f"gsa_{_f.name}"
    GSAConfigMixin.__annotations__[_g.name] = _f.type
    setattr(GSAConfigMixin, _g.name, _g)
GSAConfigMixin = dataclass(kw_only=True, repr=False)(GSAConfigMixin)


def gsa_settings(config) -> GSASettings:
    """The GSA settings a config holds."""
    return GSASettings(**{name: getattr(config, f"gsa_{name}") for name in GSA_FIELDS})


class T2RLlamaConfig(GSAConfigMixin, LlamaConfig):
    model_type = "t2r_llama"


class T2RMistralConfig(GSAConfigMixin, MistralConfig):
    model_type = "t2r_mistral"


class T2RQwen2Config(GSAConfigMixin, Qwen2Config):
    model_type = "t2r_qwen2"


class T2RQwen3Config(GSAConfigMixin, Qwen3Config):
    model_type = "t2r_qwen3"


# teacher model_type -> converted config class
T2R_CONFIGS: dict[str, type] = {
    "llama": T2RLlamaConfig,
    "mistral": T2RMistralConfig,
    "qwen2": T2RQwen2Config,
    "qwen3": T2RQwen3Config,
}
