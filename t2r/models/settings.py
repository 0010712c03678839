"""Options declared once: a dataclass field carries its default, help, bounds and command-line spelling, and the
config class, the ``t2r`` command and the recipe loader are all derived from the declaration.

``GSASettings`` is the architecture a converted checkpoint stores (its config's ``gsa_<name>`` keys). This file
travels with checkpoints (trust_remote_code), so it imports the standard library only.
"""

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FEATURE_MAPS = ("swish", "relu", "identity")
MAX_SLOTS = 1024
MAX_WINDOW = 1 << 20


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    choices: tuple | None = None,
    flag: str | None = None,
    cli: bool = True,
    cli_type: Any = None,
) -> Any:
    """A dataclass field with its help, bounds (``min``/``max`` inclusive, ``above`` exclusive; for a list, of each
    item), allowed ``choices`` and command-line spelling (``flag``, e.g. ``"--rope/--no-rope"``; ``cli=False``:
    not a command-line option; ``cli_type``: the type the command line parses before the owner converts it)."""
    meta = dict(help=help, min=min, max=max, above=above, choices=choices, flag=flag, cli=cli, cli_type=cli_type)
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list | tuple) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def describe(f: dataclasses.Field) -> str:
    """What a field accepts, in words: for error messages and help texts."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(str(c) for c in m["choices"])
    parts = []
    if m.get("above") is not None:
        parts.append(f"> {_num(m['above'])}")
    if m.get("min") is not None:
        parts.append(f">= {_num(m['min'])}")
    if m.get("max") is not None:
        parts.append(f"<= {_num(m['max'])}")
    return " and ".join(parts)


def check_fields(obj: Any, label: Callable[[str], str] = str, skip: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first field of dataclass ``obj`` whose value breaks its declaration (type,
    bounds, choices, finiteness). ``label`` turns a field name into the name the user knows (a flag, a key);
    ``skip``: fields not in use this time."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata or f.name in skip:
            continue
        value, m = getattr(obj, f.name), f.metadata
        if not _type_ok(value, hints[f.name]):
            raise ValueError(f"{label(f.name)} must be {_type_name(hints[f.name])}, got {value!r}")
        if isinstance(value, dict):
            continue  # a mapping's entries are its owner's to check
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if item is None or isinstance(item, bool):
                continue
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{label(f.name)} must be finite, got {value!r}")
            bad = (
                (m["choices"] is not None and item not in m["choices"])
                or (m["min"] is not None and item < m["min"])
                or (m["max"] is not None and item > m["max"])
                or (m["above"] is not None and not item > m["above"])
            )
            if bad:
                raise ValueError(f"{label(f.name)} must be {describe(f)}, got {value!r}")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}"
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or nothing"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(hint, hint.__name__)


@dataclass(kw_only=True)
class GSASettings:
    """The GSA architecture of a converted model (see README, "GSA as implemented")."""

    num_slots: int = option(64, "GSA memory slots M per KV head", min=1, max=MAX_SLOTS)
    feature_map: str = option("swish", "q/k feature map", choices=FEATURE_MAPS)
    gate_logit_normalizer: float = option(
        8.0, "tau in log alpha = logsigmoid(f) / tau: larger forgets more slowly", above=0, max=1e4, cli=False
    )
    gate_bias: bool = option(False, "f_proj has a per-slot bias (set by --gate-half-life-max)", cli=False)
    scale: float = option(1.0, "scale of the slot logits K q", above=0, max=1e4, cli=False)
    use_rope: bool = option(False, "apply the teacher's RoPE to q/k", flag="--rope/--no-rope")
    full_attention_layers: list[int] = option(
        [],
        "layers kept as softmax attention, e.g. 0,16; or auto:N, the N layers with the teacher's strongest "
        "retrieval heads (measured on passkey prompts, on CUDA if available)",
        min=0,
        cli_type=str,
    )
    window: int = option(0, "hybrid: sliding-window softmax attention over W tokens (0 = off)", min=0, max=MAX_WINDOW)
    window_mix_init: float = option(2.0, "hybrid: initial per-head window-share logit", min=-20, max=20)
    window_mix_per_token: bool = option(
        False, "hybrid: the window share also reads each token's hidden state (a learned router)"
    )
    window_sink: bool = option(
        False,
        "hybrid: the window also attends to a virtual first token (a newline's key and value in each layer, "
        "from one token through the teacher), as softmax attention needs its sink",
        flag="--window-sink/--no-window-sink",
    )

    def check_gsa(self, num_layers: int | None, label: Callable[[str], str] = str) -> None:
        """Every field against its declaration, then the rules between fields."""
        check_fields(self, label)
        if self.window_mix_per_token and not self.window:
            raise ValueError(f"{label('window_mix_per_token')} needs a hybrid ({label('window')} > 0)")
        if self.window_sink and not self.window:
            raise ValueError(f"{label('window_sink')} needs a hybrid ({label('window')} > 0)")
        layers = list(self.full_attention_layers)
        if len(set(layers)) != len(layers):
            raise ValueError(f"{label('full_attention_layers')} repeats a layer: {layers}")
        if num_layers is not None:
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"{label('full_attention_layers')} {bad} out of range: the model has {num_layers} layers"
                )


GSA_FIELDS = tuple(f.name for f in dataclasses.fields(GSASettings))
