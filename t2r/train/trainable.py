"""What a stage trains and how fast: its trainable set (new parameters, LoRA via peft, or everything) and the
AdamW parameter groups (per-module learning rates)."""

from __future__ import annotations

import torch
from torch import nn

from t2r.errors import T2RError
from t2r.train.recipe import Recipe, Stage
from t2r.train.run_record import NEW_PARAM_MARKERS, quiet_peft_wrap


def configure_trainable(model: nn.Module, stage: Stage, seed: int) -> tuple[nn.Module, list[str]]:
    """Freeze / wrap for the stage's mode; returns the (maybe peft-wrapped) model and trainable names."""
    model.requires_grad_(False)
    if stage.train == "full":
        model.requires_grad_(True)
    elif stage.train == "new":
        for name, p in model.named_parameters():
            p.requires_grad_(any(m in name for m in NEW_PARAM_MARKERS))
    else:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        lora = stage.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            modules_to_save=["f_proj", "g_norm", "window_mix", "window_sink"],
            bias="none",
        )
        with quiet_peft_wrap():
            model = get_peft_model(model, config)
    for p in model.parameters():  # trainable tensors live in fp32 (master weights under bf16 autocast)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise T2RError(f"stage {stage.name}: nothing to train (no GSA layers and train={stage.train})")
    return model, names


def param_groups(model: nn.Module, stage: Stage) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the stage's lr, or ``module_lr`` for parameters under a module
    of that name (the innermost one named; the stage's lr first, so the logged lr is the stage's)."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # The innermost named module wins: {window_mix: 1e-2, proj: 4e-4} gives the router inside window_mix 4e-4.
        module = next((part for part in reversed(name.split(".")) if part in stage.module_lr), None)
        used.add(module)
        groups.setdefault((stage.module_lr.get(module, stage.lr), p.ndim >= 2), []).append(p)
    unused = sorted(set(stage.module_lr) - used)
    if unused:
        raise T2RError(
            f"stage {stage.name}: module_lr names {unused[0]!r}, which holds no parameter this stage trains "
            "(a recipe for another model? override it: --set 'stages.N.module_lr={}')"
        )
    order = sorted(groups, key=lambda key: (key[0] != stage.lr, -key[1]))
    return [
        {"params": groups[key], "lr": key[0], "weight_decay": stage.weight_decay if key[1] else 0.0} for key in order
    ]


def check_module_lr(model_dir: str, recipe: Recipe) -> None:
    """A module_lr entry that names no module of this model fails before anything is written (it would otherwise
    surface only when its stage starts, after the earlier stages trained)."""
    if not any(stage.module_lr for stage in recipe.stages):
        return
    from transformers import AutoModelForCausalLM

    from t2r.models.loading import load_config

    with torch.device("meta"):  # the module tree only: no weights read or allocated
        skeleton = AutoModelForCausalLM.from_config(load_config(model_dir))
    names = {part for name, _ in skeleton.named_parameters() for part in name.split(".")}
    for i, stage in enumerate(recipe.stages):
        known = names
        if stage.train == "lora":  # peft's adapter modules (lora_A, lora_B, ...) exist only once the stage wraps
            from peft.tuners.lora import LoraLayer

            known = names | set(LoraLayer.adapter_layer_names)
        missing = sorted(set(stage.module_lr) - known)
        if missing:
            raise T2RError(
                f"stages.{i} ({stage.name}): module_lr names {missing[0]!r}, which this model does not have "
                f"(a recipe for another model? override it: --set 'stages.{i}.module_lr={{}}')"
            )
