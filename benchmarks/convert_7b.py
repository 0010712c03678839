"""Benchmark: stream-convert a Mistral-7B-shaped random bf16 checkpoint, report wall time and peak RSS.

The input has the real shapes (32 layers, hidden 4096, GQA 32/8, vocab 32000; 7.24B parameters, 14.5 GB)
and is sharded like the hub's (two shards split at 10 GB). The conversion runs as `t2r convert` in a child
process, so its peak RSS is measured alone (ru_maxrss of that child). Not a test: it needs ~30 GB of disk.
`--window 64` converts the hybrid, whose default window sink runs the teacher on one token, layer by layer
(the input gets a four-word tokenizer for it: the sink's values do not matter here, its memory does).

    python benchmarks/convert_7b.py --workdir /tmp/t2r-bench-7b [--keep] [--drop-caches] [--window 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from t2r.bench.throughput import SHAPES

MISTRAL_7B = {
    **SHAPES["mistral-7b"],
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}


MEASURE = """import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)"""


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (V, D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (D, D)),
            (f"{p}.self_attn.k_proj.weight", (kv, D)),
            (f"{p}.self_attn.v_proj.weight", (kv, D)),
            (f"{p}.self_attn.o_proj.weight", (D, D)),
            (f"{p}.mlp.gate_proj.weight", (F, D)),
            (f"{p}.mlp.up_proj.weight", (F, D)),
            (f"{p}.mlp.down_proj.weight", (D, F)),
            (f"{p}.input_layernorm.weight", (D,)),
            (f"{p}.post_attention_layernorm.weight", (D,)),
        ]
    return [*shapes, ("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def build(src: Path, shard_bytes: int = 10 * 10**9) -> None:
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(MISTRAL_7B, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    gen = torch.Generator().manual_seed(0)
    for name, shape in tensor_shapes(MISTRAL_7B):
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.normal_(0, 0.02, generator=gen) if len(shape) > 1 else t.fill_(1.0)
        nbytes = t.numel() * 2
        if size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        if len(shards) > 1 and len(shards[-2]) and size == nbytes:  # flush the finished shard
            _save(src, shards, len(shards) - 2)
    _save(src, shards, len(shards) - 1)
    n = len(shards)
    weight_map = {}
    for i in range(n):
        final = src / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (src / f"part{i}.safetensors").rename(final)
        weight_map.update(dict.fromkeys(json.loads((src / f"part{i}.json").read_text()), final.name))
        (src / f"part{i}.json").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def add_tokenizer(src: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(src)


def _save(src: Path, shards: list[dict], i: int) -> None:
    save_file(shards[i], str(src / f"part{i}.safetensors"), metadata={"format": "pt"})
    (src / f"part{i}.json").write_text(json.dumps(list(shards[i])))
    shards[i] = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/t2r-bench-7b"))
    ap.add_argument("--keep", action="store_true", help="keep the input and output checkpoints")
    ap.add_argument("--drop-caches", action="store_true", help="start from a cold page cache (needs root)")
    ap.add_argument("--window", type=int, default=0, help="convert the hybrid (with its default window sink)")
    args = ap.parse_args()
    src, out = args.workdir / "mistral-7b-shaped", args.workdir / "converted"
    if not (src / "model.safetensors.index.json").is_file():
        t = time.time()
        build(src)
        print(f"built input in {time.time() - t:.0f} s", flush=True)
    if args.window and not (src / "tokenizer.json").is_file():
        add_tokenizer(src)
    in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    if args.drop_caches:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    t2r = Path(sys.executable).parent / "t2r"
    command = [str(t2r), "convert", str(src), str(out), "--num-slots", "64", "--window", str(args.window), "--force"]
    # A fresh interpreter runs the conversion and reports its children's peak RSS: this process's own children
    # (the input's builder) would count in its ru_maxrss too.
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode:
        sys.exit(f"convert failed: {proc.stderr[-2000:]}")
    peak_gb = int(proc.stdout.strip().splitlines()[-1]) / 1024**2
    record = json.loads((out / "conversion.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "input_gb": round(in_bytes / 1e9, 2),
        "output_gb": round(record["output_bytes"] / 1e9, 2),
        "params_total": record["params_total"],
        "cold_cache": args.drop_caches,
        "window": args.window,
        "window_sink": record["options"]["window_sink"],
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak_gb, 2),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
