"""Do FLA's GSA model and t2r's converted model give the same logits? (issue: export --format fla)

    python benchmarks/gpu/fla_parity.py [EXPORT_DIR] [--json OUT]

EXPORT_DIR is a `t2r export --format fla` directory (a trained model); without it a SmolLM2-135M-shaped model
with random weights is converted, saved and exported here. Both models run in bf16 on the GPU on the same
token ids, through their own kernels (t2r's Triton kernels; FLA's chunk_gsa for long inputs and its fused
recurrent kernel for short ones); the fp32 PyTorch reference path of t2r is the exact value both are scored
against. FLA is imported only here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", nargs="?")
    ap.add_argument("--json")
    ap.add_argument("--fla-dtypes", default="bf16,fp32", help="FLA runs to compare (each autotunes its kernels)")
    args = ap.parse_args()
    import fla  # noqa: F401  (registers FLA's model types with the Auto classes)
    from transformers import AutoModelForCausalLM

    from t2r.kernels.tuning import tuned
    from t2r.models.loading import load_converted

    if args.export_dir:
        dest = Path(args.export_dir)
    else:
        from t2r.bench.throughput import shaped_model
        from t2r.export.exporter import export

        work = Path(tempfile.mkdtemp())
        model = shaped_model("smollm2-135m", dtype=torch.float32, device="cpu")
        with torch.no_grad():  # gates that differ across slots and tokens, norms that are not all ones
            for name, p in model.named_parameters():
                if "f_proj" in name:
                    p.normal_(0, 0.5)
                elif p.ndim == 1:
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(work / "converted")
        dest = export(work / "converted", work / "export", dtype="bf16", fmt="fla")
    torch.manual_seed(0)
    rows = {}
    exact = load_converted(dest, torch.float32).cuda().eval()
    ours = load_converted(dest, torch.bfloat16).cuda().eval()
    kinds = args.fla_dtypes.split(",")
    fla_models = {
        kind: AutoModelForCausalLM.from_pretrained(dest / "fla", dtype=getattr(torch, DTYPES[kind])).cuda().eval()
        for kind in kinds
    }
    vocab = exact.config.vocab_size
    for batch, length in ((2, 40), (2, 1000)):  # FLA: fused recurrent (<= 64 tokens) and chunked paths
        ids = torch.randint(0, vocab, (batch, length), device="cuda")
        with torch.no_grad():
            with tuned(impl="reference"):
                ref = exact(ids, use_cache=False).logits.float()
            a = ours(ids, use_cache=False).logits.float()
            fla_logits = {kind: m(ids, use_cache=False).logits.float() for kind, m in fla_models.items()}
        row = {"t2r_bf16_vs_exact": rel(a, ref)}
        if "fp32" in fla_logits:
            row["fla_fp32_vs_exact"] = rel(fla_logits["fp32"], ref)
        if "bf16" in fla_logits:
            b = fla_logits["bf16"]
            row |= {
                "fla_vs_t2r_bf16": rel(b, a),
                "fla_bf16_vs_exact": rel(b, ref),
                "top1_agreement_fla_t2r": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            }
        rows[f"{batch}x{length}"] = row
    result = {"export": str(dest), "device": torch.cuda.get_device_name(), "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    for key in ("fla_fp32_vs_exact", "fla_vs_t2r_bf16"):
        if key in row:
            print(f"max relative logit gap {key}: {max(r[key] for r in rows.values()):.2e}")


if __name__ == "__main__":
    main()
