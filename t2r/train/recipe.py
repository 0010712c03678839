"""Training recipes: YAML files mapped onto dataclasses, with dotted ``key=value`` overrides.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from t2r.errors import T2RError

TRAIN_MODES = ("new", "lora", "full")
LOSSES = ("transfer", "ce", "kd")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class Stage:
    name: str = "finetune"
    train: str = "new"  # new | lora | full
    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    loss: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})
    kd_temperature: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Learning rates by module name, e.g. {window_mix: 1.0e-2}: a hybrid's per-head window share is one logit per
    # head, and Adam moves a parameter by at most about lr per step, so at a full finetune's lr it barely moves.
    module_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class DataSettings:
    text_field: str = "text"
    encoding_errors: str = "strict"  # text files: strict | replace | ignore (as bytes.decode)
    add_eos: bool = True
    eval_fraction: float = 0.01
    recall_fraction: float = 0.0  # training rows rewritten as synthetic long-range recall tasks (t2r.train.recall)
    recall_answer_weight: float = 1.0  # loss weight of a recall row's answer tokens (CE and KD)


@dataclass
class Recipe:
    seq_len: int = 2048
    micro_batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    precision: str = "bf16"  # bf16 autocast on CUDA; fp32 elsewhere unless forced
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (t2r.train.compiled): fuses the small ops around the GSA kernels; the first
    # steps and every new sequence length pay the compilation. Attention-transfer stages stay eager.
    compile: bool = False
    max_grad_norm: float = 1.0
    calibrate_rows: int = 16  # rows used to calibrate the GSA output norms before training (0 = off)
    log_every: int = 1
    eval_every: int = 50
    eval_rows: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    teacher_device: str | None = None  # KD teacher placement when it is a separate model
    data: DataSettings = field(default_factory=DataSettings)
    stages: list[Stage] = field(default_factory=lambda: [Stage()])

    def validate(self) -> None:
        if self.seq_len < 2 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise T2RError("seq_len must be >= 2, micro_batch_size and grad_accum >= 1")
        if self.precision not in ("bf16", "fp32"):
            raise T2RError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise T2RError(f"distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.data.encoding_errors not in ("strict", "replace", "ignore"):
            raise T2RError(f"data.encoding_errors must be strict, replace or ignore, got {self.data.encoding_errors!r}")
        if not 0 <= self.data.eval_fraction < 1:
            raise T2RError("data.eval_fraction must be in [0, 1)")
        if not 0 <= self.data.recall_fraction <= 1:
            raise T2RError("data.recall_fraction must be in [0, 1]")
        if not self.data.recall_answer_weight > 0:
            raise T2RError("data.recall_answer_weight must be > 0")
        if not self.stages:
            raise T2RError("a recipe needs at least one stage")
        for i, st in enumerate(self.stages):
            where = f"stages.{i} ({st.name})"
            if st.train not in TRAIN_MODES:
                raise T2RError(f"{where}: train must be one of {', '.join(TRAIN_MODES)}, got {st.train!r}")
            unknown = set(st.loss) - set(LOSSES)
            if unknown:
                raise T2RError(f"{where}: unknown loss {sorted(unknown)}; use {', '.join(LOSSES)}")
            if not any(w > 0 for w in st.loss.values()):
                raise T2RError(f"{where}: needs a positive loss weight")
            if st.loss.get("transfer", 0) > 0 and st.train == "full":
                raise T2RError(
                    f"{where}: attention transfer compares against the frozen teacher attention; "
                    "train 'new' or 'lora' in that stage"
                )
            if st.steps < 1 or st.lr <= 0:
                raise T2RError(f"{where}: steps must be >= 1 and lr > 0")
            for module, lr in st.module_lr.items():
                try:
                    st.module_lr[module] = float(lr)  # YAML reads 1e-2 (no dot) as text
                except (TypeError, ValueError):
                    raise T2RError(f"{where}: module_lr.{module} must be a number, got {lr!r}") from None
                if not st.module_lr[module] > 0:
                    raise T2RError(f"{where}: module_lr.{module} must be > 0")

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise T2RError(f"{where or 'recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise T2RError(f"unknown recipe key {'.'.join(filter(None, [where, unknown[0]]))!r}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        path = ".".join(filter(None, [where, key]))
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        elif key == "stages":
            if not isinstance(value, list):
                raise T2RError("stages must be a list")
            kwargs[key] = [_build(Stage, v, f"stages.{i}") for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value, hint, path: str):
    """Check a scalar against its field type; YAML reads '1e-4' as a string, so numbers in text are accepted."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    wanted = set(typing.get_args(hint)) if union else {hint}
    if value is None and type(None) in wanted:
        return None
    if float in wanted and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if int in wanted and isinstance(value, int) and not isinstance(value, bool):
        return value
    if bool in wanted and isinstance(value, bool):
        return value
    if str in wanted and isinstance(value, str):
        return value
    origin = {typing.get_origin(t) or t for t in wanted}
    if (list in origin and isinstance(value, list)) or (dict in origin and isinstance(value, dict)):
        return value
    raise T2RError(f"recipe key {path!r} expects {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply 'a.b.0.c=value' to the raw recipe mapping (lists indexed by number)."""
    if "=" not in assignment:
        raise T2RError(f"override {assignment!r} must look like key=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise T2RError(f"override {key}: no list item {part}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise T2RError(f"override {key}: no list item {last}")
        node[int(last)] = yaml.safe_load(value)
    else:
        node[last] = yaml.safe_load(value)


SHIPPED = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes installed with t2r (``--recipe NAME``)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``smollm2-135m`` or ``smollm2-135m.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise T2RError(f"recipe {name_or_path} not found (a YAML file, or one of: {', '.join(shipped_recipes())})")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    raw: dict = {}
    if path is not None:
        path = resolve_recipe(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise T2RError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if "stages" not in raw:
        raw["stages"] = [{}]
    for item in overrides or []:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict) -> Recipe:
    """A validated Recipe from its mapping form (a YAML file's contents, or run.json's copy)."""
    recipe = _build(Recipe, raw, "")
    recipe.validate()
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
