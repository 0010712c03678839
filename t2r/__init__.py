"""t2r: turn pretrained Transformer LLMs into Gated Slot Attention RNNs.

``import t2r`` registers the converted architectures with transformers' Auto classes, so a converted
directory loads with plain ``AutoModelForCausalLM.from_pretrained``.
"""

from pathlib import Path

# In a source checkout, kernels/ and cli.py sit beside this folder (the design card's layout); expose them as
# t2r.kernels and t2r.cli. Installed wheels already carry them inside the package.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "cli.py").is_file() and (_checkout / "kernels" / "gsa_ops.py").is_file():
    __path__.append(str(_checkout))

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from .modeling import T2R_CONFIGS, T2R_MODELS, GSACache  # noqa: E402

for _config_cls in T2R_CONFIGS.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
for _config_cls, _model_cls in T2R_MODELS.items():
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["GSACache", "__version__"]
