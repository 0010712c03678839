"""What ``t2r convert`` can be asked: the GSA architecture (``GSASettings``, stored in the converted config) plus
how to convert (gate initialisation, dtype, shards). Declared once here; the command line is built from these
fields. Imports nothing heavy, so that ``t2r convert --help`` starts at once."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from t2r.errors import T2RError
from t2r.models.settings import GSASettings, option

GATE_INITS = ("random", "kproj")
DTYPE_NAMES = ("bf16", "fp16", "fp32")
MAX_AUTO_LAYERS = 512


def flag(name: str) -> str:
    """The command-line spelling of a field, as the user typed it (``--num-slots``, ``--rope``)."""
    f = {f.name: f for f in dataclasses.fields(ConvertOptions)}.get(name)
    spelled = f.metadata.get("flag") if f is not None else None
    return spelled.split("/")[0] if spelled else "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class ConvertOptions(GSASettings):
    gate_init: str = option("kproj", "random: N(0, 0.02); kproj: pooled teacher k_proj rows", choices=GATE_INITS)
    gate_half_life_max: float = option(
        0.0, "per-slot gate bias: memory half-lives log-spaced up to this many tokens (0 = none)", min=0, max=1e9
    )
    full_attention_auto: int = option(
        0, "keep this many layers, those with the teacher's strongest retrieval heads", min=0,
        max=MAX_AUTO_LAYERS, cli=False,
    )  # fmt: skip
    dtype: str | None = option(None, "bf16, fp16 or fp32 (default: the teacher's)", choices=(None, *DTYPE_NAMES))
    max_shard_size: str = option("2GB", "largest output shard")
    seed: int = option(0, "seed for random gate init", min=0, max=2**63 - 1)
    # None: on for hybrids, off otherwise (a window without its sink collapses).
    window_sink: bool | None = option(
        None,
        GSASettings.__dataclass_fields__["window_sink"].metadata["help"] + " (on by default with --window)",
        flag="--window-sink/--no-window-sink",
    )

    def __post_init__(self) -> None:
        if self.window_sink is None:
            self.window_sink = isinstance(self.window, int) and self.window > 0

    def validate(self, num_layers: int | None = None) -> None:
        """One-line errors (T2RError) naming the option as typed, for every declared bound and rule."""
        from t2r.shards import parse_size

        try:
            self.check_gsa(num_layers, label=flag)
        except ValueError as e:
            raise T2RError(str(e)) from None
        if self.gate_half_life_max and not self.gate_half_life_max > self.gate_logit_normalizer:
            raise T2RError(
                f"--gate-half-life-max must be above the unbiased half-life of {self.gate_logit_normalizer:g} tokens "
                f"(or 0 for no gate bias), got {self.gate_half_life_max:g}"
            )
        if self.full_attention_auto and self.full_attention_layers:
            raise T2RError("--full-attention-layers takes either a list of layers or auto:N, not both")
        if num_layers is not None and self.full_attention_auto >= num_layers:
            raise T2RError(
                f"--full-attention-layers auto:{self.full_attention_auto} would keep every layer: the model has "
                f"{num_layers}"
            )
        parse_size(self.max_shard_size)

    def gsa_settings(self) -> GSASettings:
        """The architecture part (what the converted config stores)."""
        names = [f.name for f in dataclasses.fields(GSASettings)]
        return GSASettings(**{name: getattr(self, name) for name in names})


def parse_full_attention(text: str | list[int] | None) -> tuple[list[int], int]:
    """'0,16' -> ([0, 16], 0); 'auto:4' -> ([], 4): the layers, or how many to pick from the teacher."""
    if isinstance(text, list):
        return list(text), 0
    text = (text or "").strip()
    if text.startswith("auto"):
        _, sep, n = text.partition(":")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise T2RError(f"--full-attention-layers auto:N needs a positive integer N, got {text!r}")
        return [], int(n)
    if text and not re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text):
        raise T2RError(f"--full-attention-layers expects comma-separated integers or auto:N, got {text!r}")
    return [int(x) for x in text.split(",") if x.strip()], 0
