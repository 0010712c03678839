"""Shared helpers: tiny random teachers of each supported architecture and an error metric."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's CPU interpreter (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (scripts/test.sh: one worker per core) each worker's torch gets its share of the cores, not
# all of them: the workers would otherwise fight over every core in their intra-op thread pools. The processes a
# test starts get the same share (OMP_NUM_THREADS), so that their results match the worker's bit for bit (the
# thread count changes a CPU matmul's summation order).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def _patch_triton_interpreter() -> None:
    """Triton 3.x's interpreter turns scalars into 1-element arrays and loops with ``range(int(array))``, which
    NumPy >= 2.4 refuses; index through the single element instead. Test-only: compiled kernels are unaffected."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_interpreter()

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

import t2r  # noqa: E402, F401  (registers the converted architectures)
from t2r.models.configuration_t2r import T2R_CONFIGS  # noqa: E402

TEACHER_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}

TINY = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ARCH_EXTRA = {
    "llama": dict(num_key_value_heads=6),  # plain multi-head attention
    "mistral": dict(sliding_window=None),  # GQA, group 3
    "qwen2": dict(attention_bias=True),  # the family's q/k/v biases
    "qwen3": dict(head_dim=16),  # q/k norms
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, Hkv, K, V, M, dtype=torch.float32, gate_scale=1.0, state=True, N=None, device="cpu"):
    """Random GSA op inputs (leaves requiring grad) and, optionally, an initial state for N sequences."""
    import torch.nn.functional as F

    q = torch.randn(B, T, H, K, device=device)
    k = torch.randn(B, T, Hkv, K, device=device)
    v = torch.randn(B, T, Hkv, V, device=device)
    g = F.logsigmoid(torch.randn(B, T, Hkv, M, device=device) * gate_scale) / 8
    s = -torch.expm1(g)
    n = B if N is None else N
    h0 = (torch.randn(n, Hkv, K, M, device=device), torch.randn(n, Hkv, M, V, device=device)) if state else None
    tensors = [x.to(dtype).requires_grad_() for x in (q, k, v, s, g)]
    if h0 is not None:
        h0 = tuple(x.requires_grad_() for x in h0)
    return tensors, h0


def run_with_grads(fn, inputs, h0, outputs=("o", "hk", "hv"), **kw):
    """Output, final state and the gradients of every input under fixed random cotangents on ``outputs`` (None
    for an input the loss does not reach)."""
    o, (hk, hv) = fn(*inputs, 1.0 if kw.pop("unit_scale", True) else None, h0, True, **kw)
    gen = torch.Generator(device="cpu").manual_seed(1234)  # same cotangents for every implementation
    parts = {"o": o, "hk": hk, "hv": hv}
    loss = sum((parts[n].float() * torch.randn(parts[n].shape, generator=gen).to(o.device)).sum() for n in outputs)
    leaves = list(inputs) + (list(h0) if h0 is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return o, hk, hv, grads


def teacher_config(arch: str, **overrides):
    return TEACHER_CONFIGS[arch](**{**TINY, **ARCH_EXTRA[arch], **overrides})


def gsa_config(arch: str = "mistral", num_slots: int = 16, teacher_overrides: dict | None = None, **gsa):
    teacher = teacher_config(arch, **(teacher_overrides or {})).to_dict()
    teacher.pop("model_type", None)
    return T2R_CONFIGS[arch](**teacher, gsa_num_slots=num_slots, **gsa)


def tiny_gsa_model(arch: str = "mistral", seed: int = 0, teacher_overrides: dict | None = None, **gsa):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gsa_config(arch, teacher_overrides=teacher_overrides, **gsa)).eval()
    # Larger gates than the N(0, 0.02) init so that decay actually varies across slots and tokens.
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "f_proj"):
                layer.self_attn.f_proj.weight.normal_(0, 0.5)
    return model


@pytest.fixture(params=sorted(TEACHER_CONFIGS))
def arch(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs each run; the seed is printed (shown on failure) and T2R_TEST_SEED replays it."""
    seed = int(os.environ.get("T2R_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"T2R_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return seed


def corpus_text(n_chars: int = 60_000, offset: int = 0) -> str:
    """Real English text available on every machine (Python's pydoc topics)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[offset : offset + n_chars]


def tiny_tokenizer(vocab_size: int = 101, bos: bool = False, alphabet: int = 80, chars: int = 20_000):
    """A small byte-level BPE tokenizer trained on the corpus text (offline), optionally adding BOS like Llama's.
    At the default size its vocabulary varies a little between calls (the trainer breaks ties in hash order:
    about 135-155 entries), so tests draw random ids below 100."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:alphabet],
        show_progress=False,
    )
    tok.train_from_iterator([corpus_text(chars)], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_teacher(path, arch: str = "llama", **overrides):
    """A tiny random teacher with a real tokenizer, saved as a Hugging Face directory at PATH; returns PATH."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(teacher_config(arch, vocab_size=len(tok), **overrides))
    teacher.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory):
    """A tiny Llama teacher with a real tokenizer, converted to GSA (kproj gates, 16 slots)."""

    from t2r.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("tiny")
    save_tiny_teacher(root / "teacher")
    return convert(str(root / "teacher"), root / "converted", ConvertOptions(num_slots=16), progress=False)


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paths = []
    for i in range(3):
        p = root / f"doc{i}.txt"
        p.write_text(corpus_text(15_000, offset=i * 15_000))
        paths.append(str(p))
    return paths


@pytest.fixture(scope="session")
def tiny_run(tiny_converted, corpus_files, tmp_path_factory):
    """A finished two-stage run (transfer on new parameters, then LoRA) of the tiny converted model."""
    from pathlib import Path

    from t2r.train.trainer import finetune

    recipe = Path(__file__).resolve().parent.parent / "t2r" / "train" / "recipes" / "tiny-test.yaml"
    return finetune(
        str(tiny_converted), tmp_path_factory.mktemp("run") / "run", corpus_files, str(recipe), progress=False
    )


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """Run the t2r command in-process; returns the exit code and the stderr lines."""
    import sys

    from t2r.cli import main

    capsys.readouterr()  # drop output from test setup
    argv = sys.argv
    sys.argv = ["t2r", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = argv
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


def run_without_t2r(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    """SCRIPT (after BLOCK_T2R) in a fresh Python with ARGS, offline, with its own trust_remote_code module cache."""
    env = {**os.environ, "HF_MODULES_CACHE": str(Path(cwd) / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", BLOCK_T2R + script, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# Prepended to subprocess scripts that must run as on a machine without t2r installed.
BLOCK_T2R = """
import sys
class BlockT2R:
    def find_spec(self, name, path=None, target=None):
        if name == "t2r" or name.startswith("t2r."):
            raise ImportError("t2r is not installed here")
sys.meta_path.insert(0, BlockT2R())
"""
