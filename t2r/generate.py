"""Text generation through transformers' generate(): greedy or sampled, batched with left padding, streamed."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from t2r.devices import resolve_device
from t2r.errors import T2RError, first_line
from t2r.models.loading import load_converted, load_tokenizer
from t2r.train.run_record import RUN_FILE, rebuild_model


def load_for_generation(path: str | Path, device: str | None = None, dtype: str | None = None):
    """Model and tokenizer from an exported or converted directory, or a run (rebuilt, adapters merged)."""
    from t2r.shards import DTYPES
    from t2r.train.run_record import read_run

    path = Path(path)
    device = resolve_device(device)
    torch_dtype = DTYPES[dtype] if dtype else torch.float32
    if (path / RUN_FILE).is_file():
        model, tok_dir = rebuild_model(path, dtype=torch_dtype), Path(read_run(path).model_dir)
    else:
        model, tok_dir = load_converted(path, torch_dtype), path
    try:
        tokenizer = load_tokenizer(tok_dir)
    except (OSError, ValueError) as e:
        raise T2RError(f"no usable tokenizer in {tok_dir}: {first_line(e)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


MAX_NEW_TOKENS = 1 << 20
MAX_PROMPTS = 4096


def check_generation(prompts: list[str], max_new_tokens: int, temperature: float, top_p: float, stream: bool) -> None:
    """One-line errors for requests generate() would mishandle or refuse deep inside transformers."""
    if not prompts:
        raise T2RError("give at least one --prompt")
    if len(prompts) > MAX_PROMPTS:
        raise T2RError(f"at most {MAX_PROMPTS} prompts per call, got {len(prompts)}")
    if any(not p for p in prompts):
        raise T2RError("--prompt is empty; give some text to continue")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise T2RError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
    if not (math.isfinite(temperature) and 0 <= temperature <= 100):
        raise T2RError(f"--temperature must be a number in [0, 100] (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise T2RError(f"--top-p must be in (0, 1], got {top_p}")
    if stream and len(prompts) != 1:
        raise T2RError("--stream works with a single prompt")


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    chat: bool = False,
) -> list[str]:
    """Continue each prompt; temperature 0 is greedy. Streaming prints tokens as they come (one prompt)."""
    check_generation(prompts, max_new_tokens, temperature, top_p, stream)
    if chat:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
