"""Every tunable of the GSA kernels in one place, read from the environment once (``T2R_GSA_*``) and changeable
at run time with :func:`tuned` (tests, benchmarks, A/B probes). Host code reads ``TUNING`` at each call, so a
change takes effect on the next call; compiled kernels specialise on the values they are launched with.

docs/benchmarks.md records the measurements behind each default."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# Kernel groups whose fp32-intermediate products may take the inputs' half precision (``dot``):
# scan: the memories' forward scan; dscan: their gradients' reverse scan; out: the forward walk's slot logits and
# memory updates; o: the forward walk's output products; sweep: the backward's forward walk; rev: the reverse walks.
PREC_GROUPS = ("scan", "dscan", "out", "o", "sweep", "rev")
# The switches of the training fusions (what `t2r bench train --fusions` flips together).
TRAINING_FUSIONS = ("fused_norm_grad", "fused_prologue", "fused_mlp", "merged_projections")
IMPLS = ("auto", "reference", "triton")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"T2R_GSA_{name}", default)


@dataclass
class Tuning:
    # auto: Triton on CUDA tensors, the reference elsewhere; reference: always; triton: also on CPU tensors (which
    # then needs TRITON_INTERPRET=1: the CPU tests).
    impl: str = field(default_factory=lambda: _env("IMPL", "auto"))
    segment: int = field(default_factory=lambda: int(_env("SEGMENT", "64")))  # tokens between stored states
    subchunk: int = field(default_factory=lambda: int(_env("SUBCHUNK", "16")))  # rows of an in-segment product
    # Products of fp32 intermediates for bf16 inputs: "tf32", "half", or "half:GROUP,..." (PREC_GROUPS). The
    # default takes the forward walk's slot logits and memory updates in bf16; more groups in half lose accuracy.
    dot: str = field(default_factory=lambda: _env("DOT", "half:out"))
    # fp16 inputs take the half groups only when asked for: fp16 cannot hold the sub-chunk decay factors (up to
    # exp(60) under strongly forgetting gates) that bf16 can.
    dot_fp16: bool = field(default_factory=lambda: "T2R_GSA_DOT" in os.environ)
    state_block: int = field(default_factory=lambda: int(_env("STATE_BLOCK", "64")))  # memory rows per scan program
    stages: int = field(default_factory=lambda: int(_env("STAGES", "2")))
    # The memories' scans (forward and reverse) in two levels: each sequence's segments in this many parts scanned
    # in parallel, then each part's carry added (1: one walk per sequence; 0, the default: chosen per call by
    # chunk.auto_scan_parts). For few sequences x KV heads, whose walks fill few SMs: at SmolLM2-135M's 3 KV heads
    # and 1 x 16k the GSA op's GPU time per training step fell from 63.7 to 28.2 ms (H200, 2026-12-05;
    # docs/benchmarks.md). Many sequences or heads keep one walk (auto_scan_parts gives 1).
    scan_parts: int = field(default_factory=lambda: int(_env("SCAN_PARTS", "0")))
    warps: int = field(default_factory=lambda: int(_env("WARPS", "0")))  # 0: by tile size
    # Decoding: warps per (sequence, KV head) program, and the rows / columns one step streams the memories in
    # (0: the all-at-once kernel).
    decode_warps: int = field(default_factory=lambda: int(_env("DECODE_WARPS", "4")))
    decode_block: int = field(default_factory=lambda: int(_env("DECODE_BLOCK", "32")))
    # The one-token step split over its memories' blocks in two launches (kernels/decode_jit.py): "on", "off", or
    # "auto" (the default: where sequences x KV heads are fewer than the multiprocessors, or under GQA;
    # decode.split_step says what the H200 showed).
    decode_split: str = field(default_factory=lambda: _env("DECODE_SPLIT", "auto"))
    # The one-token step in one pass with both memories whole in registers (kernels/decode_jit.py): "on" where they
    # fit (decode.WHOLE_MAX), or "off" (the default until a GPU has timed it; "auto" is "off" for now).
    decode_whole: str = field(default_factory=lambda: _env("DECODE_WHOLE", "off"))
    # The forward output: a segment at a time ("blocks", up to 64 slots; products at the segment's full length) or
    # a walk over sub-chunks ("walk"; more slots always walk: at 128 the block kernels spill).
    fwd_blocks: bool = field(default_factory=lambda: _env("FWD", "blocks") == "blocks")
    fwd_warps: int = field(default_factory=lambda: int(_env("FWD_WARPS", "4")))
    # Memory for speed: keep the forward's per-segment states ((K + V) * M * 4 bytes per segment and KV head) and
    # its slot softmax (M * 4 bytes per token and query head) for the backward instead of recomputing them. Off:
    # the kernels get faster, whole training steps do not (docs/benchmarks.md).
    save_states: bool = field(default_factory=lambda: _env("SAVE_STATES", "0") == "1")
    save_probs: bool = field(default_factory=lambda: _env("SAVE_PROBS", "0") == "1")
    # RoPE of q and k in one launch outside autograd (kernels/rotary.py), and a hybrid layer's window attention,
    # mix and ring update in two decoding launches (kernels/window.py). On since they ran on an H200 (2026-12-05):
    # their tests and the captured decoding against the reference passed there, and the W = 512 hybrid's step at
    # batch 16 and 32k took 3.01 ms against 4.04 ms in PyTorch (docs/benchmarks.md).
    fused_rope: bool = field(default_factory=lambda: _env("FUSED_ROPE", "1") == "1")
    fused_window: bool = field(default_factory=lambda: _env("FUSED_WINDOW", "1") == "1")
    # Training fusions (TRAINING_FUSIONS), on since an H200 timed them (2026-12-05, SmolLM2-135M, 1 x 4k / 1 x 16k:
    # 0.160 -> 0.152 s and 0.194 -> 0.153 s per step, peak 6.72 -> 5.53 GB and 21.3 -> 16.3 GB; docs/benchmarks.md):
    # RMSNorm's forward and backward in Triton under autograd (kernels/norm.py);
    fused_norm_grad: bool = field(default_factory=lambda: _env("FUSED_NORM_GRAD", "1") == "1")
    # a GSA layer's input maps (feature maps, silu values, gates) in one launch each way (kernels/prologue.py);
    fused_prologue: bool = field(default_factory=lambda: _env("FUSED_PROLOGUE", "1") == "1")
    # an MLP's silu(gate) * up in one launch each way (kernels/swiglu.py), also when decoding;
    fused_mlp: bool = field(default_factory=lambda: _env("FUSED_MLP", "1") == "1")
    # a GSA layer's q/k/v/gate projections and an MLP's gate/up as one GEMM each way (models/projections.py).
    merged_projections: bool = field(default_factory=lambda: _env("MERGED_PROJECTIONS", "1") == "1")
    # Decoding: the same projections as one Triton launch over the separate weights (kernels/grouped_linear.py),
    # the output and down projections as one launch each, instead of cuBLAS's. On since an H100 timed SmolLM2-135M's
    # captured decoding step with q/k/v/gates and gate/up grouped (2026-12-06; GPU busy per token 1.523 -> 1.188 ms
    # at batch 1, 1.577 -> 1.472 ms at batch 16; docs/benchmarks.md); the one-weight maps and contiguous outputs
    # that came after are untimed.
    grouped_projections: bool = field(default_factory=lambda: _env("GROUPED_PROJECTIONS", "1") == "1")
    # Decoding: a grouped projection's neighbours in its launch (the RMSNorm before it, up to
    # models/projections.FOLDED_NORM_MAX inputs; an MLP's silu(gate) * up in its gate/up launch; the residual add
    # after). Each saves a launch a layer. On since an H100 timed it (2026-12-06, SmolLM2-135M's captured step at
    # 1k: GSA 1.186 -> 1.078 ms a token at batch 1, 1.263 -> 1.189 at 16).
    fused_maps: bool = field(default_factory=lambda: _env("FUSED_MAPS", "1") == "1")
    # Decoding: every decoding kernel (grouped projections, RMSNorm, RoPE, the GSA step, the window step) launched
    # as a programmatic dependent (kernels/pdl.py, Hopper+): each starts while the one before it finishes. On since
    # timed with the fused maps (same H100: GSA 1.139 -> 0.787 ms at batch 1, 1.224 -> 0.905 at 16; the W = 512
    # hybrid 1.549 -> 1.102 and 1.662 -> 1.247, both switches off against both on).
    pdl: bool = field(default_factory=lambda: _env("PDL", "1") == "1")
    # Next-token cross-entropy (and distillation's KL) in one launch each way, with nothing vocabulary-sized kept
    # (kernels/cross_entropy.py), instead of the chunked fp32 log-softmax, recomputed in the backward. On since an
    # H200 timed it (2026-12-05, SmolLM2-135M at 1 x 16k: the step's elementwise GPU time 36.1 -> 8.0 ms, peak
    # 16.1 -> 14.5 GB; docs/benchmarks.md).
    fused_ce: bool = field(default_factory=lambda: _env("FUSED_CE", "1") == "1")
    # The backward's two reverse walks (one per memory) in one launch: a launch fewer per layer, twice the programs;
    # off until timed on a GPU (spills about as much offline, benchmarks/kernel_resources.py).
    merged_rev: bool = field(default_factory=lambda: _env("MERGED_REV", "0") == "1")
    poison: bool = False  # tests: fill outputs with NaN before the kernels run, so that unwritten elements show

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"T2R_GSA_IMPL={self.impl!r}: expected one of {IMPLS}")
        for name in ("segment", "subchunk", "state_block"):
            n = getattr(self, name)
            if n < 16 or n & (n - 1):
                raise ValueError(f"T2R_GSA_{name.upper()}={n}: expected a power of two >= 16")
        for name in ("decode_split", "decode_whole"):
            if getattr(self, name) not in ("on", "off", "auto"):
                raise ValueError(f"T2R_GSA_{name.upper()}={getattr(self, name)!r}: expected on, off or auto")
        if self.scan_parts < 0:
            raise ValueError(f"T2R_GSA_SCAN_PARTS={self.scan_parts}: expected a count >= 1, or 0 (automatic)")
        if self.segment % self.subchunk:
            raise ValueError(f"the segment ({self.segment}) must be a multiple of the sub-chunk ({self.subchunk})")
        half_groups(self.dot)


def half_groups(mode: str) -> set[str]:
    """The kernel groups a ``dot`` mode runs in half precision."""
    if mode in ("tf32", "half"):
        return set(PREC_GROUPS) if mode == "half" else set()
    names = set(mode.removeprefix("half:").split(","))
    if not mode.startswith("half:") or not names <= set(PREC_GROUPS):
        raise ValueError(f"T2R_GSA_DOT={mode!r}: expected tf32, half or half:GROUP,... with groups {PREC_GROUPS}")
    return names


TUNING = Tuning()


def parse_changes(text: str) -> dict[str, bool | int | str]:
    """``"save_states=1,dot=half:out"`` -> tunables and values of their fields' types (what a benchmark's variant
    changes). Unknown names and values that do not parse raise ValueError; :func:`tuned` checks the rest."""
    types = {f.name: f.type for f in dataclasses.fields(Tuning)}
    changes: dict[str, bool | int | str] = {}
    for item in filter(None, re.split(r",(?=\s*\w+\s*=)", text)):  # a value may hold commas (dot=half:out,o)
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in types:
            raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {sorted(types)}")
        value = value.strip()
        if types[name] == "bool":
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"{item!r}: {name} takes 1 or 0")
            changes[name] = value.lower() in ("1", "true")
        elif types[name] == "int":
            try:
                changes[name] = int(value)
            except ValueError:
                raise ValueError(f"{item!r}: {name} takes an integer") from None
        else:
            changes[name] = value
    return changes


@contextlib.contextmanager
def tuned(**changes) -> Iterator[Tuning]:
    """Run with some tunables changed (checked), restoring them after."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Tuning)}
    if unknown:
        raise TypeError(f"unknown tunables {sorted(unknown)}")
    old = {name: getattr(TUNING, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(TUNING, name, value)
        TUNING.check()
        yield TUNING
    finally:
        for name, value in old.items():
            setattr(TUNING, name, value)


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill (NaN-filled under ``TUNING.poison``, so unwritten elements show)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if TUNING.poison else out
