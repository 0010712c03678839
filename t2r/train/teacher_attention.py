"""The teacher's softmax attention beside every GSA layer, for training only.

Attention transfer, output-norm calibration and a student that runs as its own teacher (KD, the teacher's
held-out loss) all need the teacher's attention over the same projections. The inference model knows nothing of
this: here each GSA layer gets a *twin*, the teacher architecture's own attention module whose q/k/v/o (and q/k
norms) are the GSA layer's modules, attached before any peft wrapping so that it keeps the frozen base weights.
Modes attach by swapping decoder layers' ``self_attn`` (the teacher) or by forward hooks (transfer, calibration).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from t2r.models.hf_compat import CACHE_ARG, CACHE_NAMES
from t2r.models.modeling_t2r import GSAAttention

SHARED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
_TWINS: weakref.WeakKeyDictionary[GSAAttention, nn.Module] = weakref.WeakKeyDictionary()


def gsa_modules(model: nn.Module) -> list[GSAAttention]:
    return [m for m in model.modules() if isinstance(m, GSAAttention)]


def _gsa_layers(model: nn.Module) -> list[tuple[nn.Module, GSAAttention]]:
    """(decoder layer, its GSA attention) pairs, through any peft/DDP wrappers."""
    return [
        (layer, layer.self_attn)
        for layer in model.modules()
        if isinstance(getattr(layer, "self_attn", None), GSAAttention)
    ]


def attach_softmax_twins(model: nn.Module) -> nn.Module:
    """Give every GSA layer its teacher twin (idempotent). Call before peft wraps the projections."""
    for layer, gsa in _gsa_layers(model):
        if gsa in _TWINS:
            continue
        with torch.device("meta"):  # the teacher's decoder layer, only for its attention class and settings
            twin = type(layer)(gsa.config, gsa.layer_idx).self_attn
        for name in SHARED_MODULES:
            if hasattr(twin, name):
                setattr(twin, name, getattr(gsa, name))
        stray = [n for n, p in twin.named_parameters() if p.is_meta]
        if stray:
            raise RuntimeError(f"the teacher attention has parameters the GSA layer does not share: {stray}")
        twin.train(gsa.training)
        _TWINS[gsa] = twin
    return model


def softmax_twin(gsa: GSAAttention) -> nn.Module:
    twin = _TWINS.get(gsa)
    if twin is None:
        raise RuntimeError("no teacher attention attached; call attach_softmax_twins(model) first")
    return twin


def _teacher_call(gsa: GSAAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """The twin on the GSA layer's own call (never cached)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in CACHE_NAMES}
    return softmax_twin(gsa)(hidden, **rest, **{CACHE_ARG: None})[0]


def _uncached(module, args, kwargs):
    """The twins never cache: a GSA model's cache holds slot memories for these layers, not keys and values."""
    return args, {**{k: v for k, v in kwargs.items() if k not in CACHE_NAMES}, CACHE_ARG: None}


@contextlib.contextmanager
def as_teacher(model: nn.Module) -> Iterator[None]:
    """Run every GSA layer as the teacher's softmax attention (its twin swapped in, uncached)."""
    swapped = [(layer, gsa, softmax_twin(gsa)) for layer, gsa in _gsa_layers(model)]
    hooks = []
    for layer, _, twin in swapped:
        hooks.append(twin.register_forward_pre_hook(_uncached, with_kwargs=True))
        layer.self_attn = twin
    try:
        yield
    finally:
        for (layer, gsa, _), hook in zip(swapped, hooks, strict=True):
            layer.self_attn = gsa
            hook.remove()


class TransferCollector:
    """Sums each GSA layer's squared error against the teacher attention output during one forward, and the
    per-channel statistics output-norm calibration needs."""

    def __init__(self) -> None:
        self.active = False
        self.sq_sum: torch.Tensor | None = None
        self.layers = 0
        self.per_layer: dict[int, torch.Tensor] = {}  # layer index -> summed squared error (detached)
        self.channel_sq: dict[int, list[torch.Tensor]] = {}  # calibration: [GSA, teacher] per-channel sums

    def add(
        self, layer_idx: int, student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor | None
    ) -> None:
        if not self.active:  # e.g. activation-checkpoint recomputation during backward
            return
        err = (student.float() - teacher.float()).pow(2).mean(-1)  # [B, T]
        if token_mask is not None:
            err = err * token_mask[:, -err.shape[1] :].to(err.dtype)
        total = err.sum()
        self.sq_sum = total if self.sq_sum is None else self.sq_sum + total
        self.per_layer[layer_idx] = self.per_layer.get(layer_idx, 0) + total.detach()
        self.layers += 1

    def add_calibration(
        self, layer_idx: int, gsa_out: torch.Tensor, teacher_out: torch.Tensor, token_mask: torch.Tensor | None
    ) -> None:
        """Per-channel sums of squares of the normalised GSA output and the teacher's attention output (the
        two inputs o_proj sees), over real tokens."""
        w = (
            torch.ones(gsa_out.shape[:2], device=gsa_out.device)
            if token_mask is None
            else token_mask[:, -gsa_out.shape[1] :].float()
        )
        sums = [(x.float().pow(2) * w[..., None]).sum(dim=(0, 1)) for x in (gsa_out, teacher_out)]
        prev = self.channel_sq.get(layer_idx)
        self.channel_sq[layer_idx] = sums if prev is None else [a + b for a, b in zip(prev, sums, strict=True)]


class _TeacherForced(torch.autograd.Function):
    """Attention transfer's layer output: the teacher's value, and no gradient to the student from later layers
    (layers learn independently). It still hangs off the student's graph, because FSDP2 schedules its backward
    hooks from layer outputs."""

    @staticmethod
    def forward(ctx, target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        return target.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


@contextlib.contextmanager
def _hooks(model: nn.Module, make_hook) -> Iterator[None]:
    """Hooks that call each layer's twin, which takes the layer's causal mask: the model builds it meanwhile
    (otherwise it builds none, and a packed batch's forward reads nothing back: the graphed training step)."""
    layers = gsa_modules(model)
    handles = [gsa.register_forward_hook(make_hook(gsa), with_kwargs=True) for gsa in layers]
    for gsa in layers:
        gsa.reads_causal_mask = True
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for gsa in layers:
            gsa.reads_causal_mask = False


@contextlib.contextmanager
def transfer(model: nn.Module, collector: TransferCollector) -> Iterator[None]:
    """Teacher-forced attention transfer: each GSA layer's output error against its twin goes to ``collector``,
    and the layer passes the teacher's output on, so every layer sees the teacher's hidden states."""

    def make_hook(gsa: GSAAttention):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                target = _teacher_call(gsa, args, kwargs)
            collector.add(gsa.layer_idx, output[0], target, kwargs.get("gsa_token_mask"))
            return _TeacherForced.apply(target, output[0]), None

        return hook

    with _hooks(model, make_hook):
        yield


@contextlib.contextmanager
def calibration(model: nn.Module, collector: TransferCollector) -> Iterator[None]:
    """Teacher-forced statistics for :func:`calibrate_output_norms`: each GSA layer's normalised output (what its
    g_norm returns) and the teacher's attention output before o_proj, per channel."""
    normed: dict[int, torch.Tensor] = {}
    norm_hooks = [
        gsa.g_norm.register_forward_hook(lambda _m, _a, out, i=gsa.layer_idx: normed.__setitem__(i, out))
        for gsa in gsa_modules(model)
    ]

    def make_hook(gsa: GSAAttention):
        def hook(module, args, kwargs, output):
            captured = []
            pre = softmax_twin(gsa).o_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
            try:
                target = _teacher_call(gsa, args, kwargs)
            finally:
                pre.remove()
            collector.add_calibration(
                gsa.layer_idx, normed.pop(gsa.layer_idx), captured[0], kwargs.get("gsa_token_mask")
            )
            return target, None

        return hook

    try:
        with _hooks(model, make_hook):
            yield
    finally:
        for h in norm_hooks:
            h.remove()


@torch.no_grad()
def calibrate_output_norms(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Data-driven init of each GSA layer's output norm: scale g_norm per channel so that what o_proj receives
    has the per-channel RMS of the teacher attention output it replaces (teacher-forced, so every layer sees
    the teacher's hidden states). An untrained GSA output is far louder than the teacher's attention output and
    would swamp the residual stream (and, in hybrids, the exact window branch). Returns the new weights."""
    attach_softmax_twins(model)
    collector = TransferCollector()
    with calibration(model, collector):
        for batch in batches:
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    new = {}
    for name, module in model.named_modules():
        if isinstance(module, GSAAttention) and module.layer_idx in collector.channel_sq:
            gsa_sq, teacher_sq = collector.channel_sq[module.layer_idx]
            ratio = (teacher_sq / gsa_sq.clamp_min(1e-12)).sqrt()
            module.g_norm.weight.mul_(ratio.to(module.g_norm.weight.dtype))
            new[f"{name}.g_norm.weight"] = module.g_norm.weight.detach().clone()
    return new
