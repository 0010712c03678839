"""Training recipes: YAML files mapped onto dataclasses, with dotted ``key=value`` overrides.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from t2r.errors import T2RError, first_line
from t2r.models.settings import check_fields, option

TRAIN_MODES = ("new", "lora", "full")
REPORTERS = ("jsonl", "tensorboard", "wandb")
LOSSES = ("transfer", "ce", "kd")


@dataclass
class LoraSettings:
    r: int = option(8, "LoRA rank", min=1, max=4096)
    alpha: int = option(16, "LoRA scaling numerator (scale = alpha / r)", min=1, max=1 << 16)
    dropout: float = option(0.0, "dropout on the LoRA branch", min=0, max=0.99)
    target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get adapters")


@dataclass
class Stage:
    name: str = option("finetune", "a name for logs and the stage's output")
    train: str = option(
        "new", "what trains: new GSA parameters, LoRA adapters (peft) or everything", choices=TRAIN_MODES
    )
    steps: int = option(100, "optimizer steps", min=1, max=10**8)
    lr: float = option(1e-3, "peak learning rate", above=0, max=10)
    min_lr_ratio: float = option(0.1, "cosine decay ends at this share of lr", min=0, max=1)
    warmup_steps: int = option(10, "linear warmup steps", min=0, max=10**8)
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", min=0, max=10)
    betas: list[float] = option([0.9, 0.95], "AdamW betas", min=0, max=0.99999)
    loss: dict[str, float] = option({"ce": 1.0}, "loss weights: transfer, ce, kd")
    kd_temperature: float = option(1.0, "distillation temperature", above=0, max=100)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    # Learning rates by module name, e.g. {window_mix: 1.0e-2}: a hybrid's per-head window share is one logit per
    # head, and Adam moves a parameter by at most about lr per step, so at a full finetune's lr it barely moves.
    module_lr: dict[str, float] = option({}, "learning rates by module name")


@dataclass
class DataSettings:
    text_field: str = option("text", "the text field of .jsonl/.parquet/datasets corpora")
    encoding_errors: str = option("strict", "text files: as bytes.decode", choices=("strict", "replace", "ignore"))
    add_eos: bool = option(True, "end every document with the EOS token")
    eval_fraction: float = option(0.01, "held-out share of rows (hash split) without --eval-data", min=0, max=0.5)
    recall_fraction: float = option(0.0, "training rows rewritten as synthetic recall tasks", min=0, max=1)
    recall_answer_weight: float = option(1.0, "loss weight of a recall row's answer tokens", above=0, max=1000)


@dataclass
class Recipe:
    seq_len: int = option(2048, "tokens per training row", min=2, max=1 << 20)
    micro_batch_size: int = option(4, "rows per forward", min=1, max=1 << 16)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1, max=1 << 16)
    seed: int = option(0, "seed of initialisation, data order and LoRA", min=0, max=2**63 - 1)
    precision: str = option("bf16", "bf16 autocast on CUDA, or fp32", choices=("bf16", "fp32"))
    gradient_checkpointing: bool = option(False, "recompute decoder layers in the backward")
    # torch.compile each decoder layer (t2r.train.compiled): fuses the small ops around the GSA kernels; the first
    # steps and every new sequence length pay the compilation. Attention-transfer stages stay eager.
    compile: bool = option(False, "torch.compile each decoder layer")
    # Each micro-batch's forward and backward replayed as a CUDA graph (t2r.train.graphed_step): the host's launch
    # time goes, which bounds small models' steps. One GPU, stages whose only loss is cross-entropy; others eager.
    graphs: bool = option(False, "replay each micro-batch's forward and backward as a CUDA graph")
    max_grad_norm: float = option(1.0, "gradient clipping", above=0, max=1e6)
    calibrate_rows: int = option(16, "rows used to calibrate the GSA output norms before training (0 = off)", min=0)
    log_every: int = option(1, "steps between log lines", min=1)
    eval_every: int = option(50, "steps between held-out evaluations (0 = at stage ends only)", min=0)
    eval_rows: int = option(16, "held-out rows per evaluation", min=0)
    checkpoint_every: int = option(50, "steps between checkpoints (0 = none but the stage ends)", min=0)
    keep_checkpoints: int = option(2, "checkpoints kept", min=1, max=1000)
    distributed: str = option("ddp", "under torchrun: ddp or fsdp (FSDP2)", choices=("ddp", "fsdp"))
    teacher_device: str | None = option(None, "KD teacher placement when it is a separate model")
    report_to: list[str] = option(
        ["jsonl"], "where logs go besides RUN/log.jsonl: tensorboard (RUN/tensorboard), wandb", choices=REPORTERS
    )
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    stages: list[Stage] = dataclasses.field(default_factory=lambda: [Stage()])

    def validate(self) -> None:
        """Every declared bound (one line naming the recipe key), then the rules between keys."""
        for where, obj in [("", self), ("data.", self.data)] + [
            item for i, st in enumerate(self.stages) for item in ((f"stages.{i}.", st), (f"stages.{i}.lora.", st.lora))
        ]:
            try:
                check_fields(obj, label=lambda name, where=where: f"{where}{name}")
            except ValueError as e:
                raise T2RError(f"recipe: {e}") from None
        if not self.stages:
            raise T2RError("a recipe needs at least one stage")
        for i, st in enumerate(self.stages):
            where = f"stages.{i} ({st.name})"
            unknown = set(st.loss) - set(LOSSES)
            if unknown:
                raise T2RError(f"{where}: unknown loss {sorted(unknown)}; use {', '.join(LOSSES)}")
            for name, weight in st.loss.items():
                if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 <= weight < 1e6:
                    raise T2RError(f"{where}: loss weight {name} must be a number in [0, 1e6), got {weight!r}")
            if not any(w > 0 for w in st.loss.values()):
                raise T2RError(f"{where}: needs a positive loss weight")
            if st.loss.get("transfer", 0) > 0 and st.train == "full":
                raise T2RError(
                    f"{where}: attention transfer compares against the frozen teacher attention; "
                    "train 'new' or 'lora' in that stage"
                )
            if len(st.betas) != 2:
                raise T2RError(f"{where}: betas must be two numbers, got {st.betas!r}")
            for module, lr in st.module_lr.items():
                try:
                    st.module_lr[module] = float(lr)  # YAML reads 1e-2 (no dot) as text
                except (TypeError, ValueError):
                    raise T2RError(f"{where}: module_lr.{module} must be a number, got {lr!r}") from None
                if not 0 < st.module_lr[module] <= 10:
                    raise T2RError(f"{where}: module_lr.{module} must be in (0, 10], got {lr!r}")

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
            raise T2RError(f"recipe {path} is not valid YAML: {first_line(e)}") from None
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
