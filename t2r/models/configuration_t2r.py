"""Configs of converted models: the teacher architecture's own config plus the GSA settings.

Each class subclasses the teacher's config class, so every teacher field (and its validation) is kept and a
converted checkpoint's config.json is the teacher's plus ``gsa_*`` keys and a new ``model_type``.
This file is copied next to exported weights (trust_remote_code), so it imports only transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FEATURE_MAPS = ("swish", "relu", "identity")


@dataclass(kw_only=True, repr=False)
class GSASettings:
    """GSA fields shared by every converted architecture (see DESIGN.md section 2)."""

    gsa_num_slots: int = 64
    gsa_feature_map: str = "swish"
    gsa_gate_logit_normalizer: float = 8.0
    gsa_gate_bias: bool = False  # f_proj has a per-slot bias (t2r convert --gate-half-life-max)
    gsa_scale: float = 1.0
    gsa_use_rope: bool = False
    gsa_full_attention_layers: list[int] = field(default_factory=list)
    gsa_window: int = 0  # > 0: hybrid layers add sliding-window softmax attention over this many tokens
    gsa_window_mix_init: float = 2.0  # initial per-head mix logit: sigmoid(2) = 88% from the window branch
    gsa_window_mix_per_token: bool = False  # the mix logit also reads the token's hidden state (a linear router)
    gsa_window_sink: bool = False  # the window also sees a fixed virtual first token (t2r convert --window-sink)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_gsa()

    def validate_gsa(self) -> None:
        if not isinstance(self.gsa_num_slots, int) or self.gsa_num_slots < 1:
            raise ValueError(f"gsa_num_slots must be a positive integer, got {self.gsa_num_slots!r}")
        if self.gsa_feature_map not in FEATURE_MAPS:
            raise ValueError(f"gsa_feature_map must be one of {FEATURE_MAPS}, got {self.gsa_feature_map!r}")
        if not self.gsa_gate_logit_normalizer > 0:
            raise ValueError(f"gsa_gate_logit_normalizer must be > 0, got {self.gsa_gate_logit_normalizer!r}")
        if not isinstance(self.gsa_window, int) or self.gsa_window < 0:
            raise ValueError(f"gsa_window must be a non-negative integer, got {self.gsa_window!r}")
        if self.gsa_window_sink and not self.gsa_window:
            raise ValueError("gsa_window_sink needs a hybrid (gsa_window > 0)")
        layers = list(self.gsa_full_attention_layers)
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"gsa_full_attention_layers must be distinct layer indices in "
                f"[0, {self.num_hidden_layers}), got {layers}"
            )

    def is_gsa_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.gsa_full_attention_layers

    @property
    def attention_head_dim(self) -> int:
        """Per-head width of q/k/v (Qwen2's config has no head_dim field)."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads


class T2RLlamaConfig(GSASettings, LlamaConfig):
    model_type = "t2r_llama"


class T2RMistralConfig(GSASettings, MistralConfig):
    model_type = "t2r_mistral"


class T2RQwen2Config(GSASettings, Qwen2Config):
    model_type = "t2r_qwen2"


class T2RQwen3Config(GSASettings, Qwen3Config):
    model_type = "t2r_qwen3"


# teacher model_type -> converted config class
T2R_CONFIGS: dict[str, type] = {
    "llama": T2RLlamaConfig,
    "mistral": T2RMistralConfig,
    "qwen2": T2RQwen2Config,
    "qwen3": T2RQwen3Config,
}
