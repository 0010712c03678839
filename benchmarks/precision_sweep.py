"""Which kernels can take their fp32-intermediate products in bf16 (T2R_GSA_DOT=half:GROUP,...) within the
issue's 1e-2 bf16 error bound, and what each saves.

For every subset of ``PREC_GROUPS`` (or the subsets given): the relative error of outputs, final states and
every gradient against the fp32 PyTorch reference on the same bf16 inputs (same seed for every subset, three
shapes), then fwd and fwd+bwd times at the issue's shapes. With FLA installed, FLA's own error on the same
check (no GQA, FLA's contract) is printed for scale.

python benchmarks/precision_sweep.py [--subset scan,out ...] [--shape 8x2048 ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from t2r.bench.kernels import _bench, _fla, _fwd_bwd, _inputs, check_against_reference, rel_err
from t2r.kernels import chunk as kernels
from t2r.kernels.tuning import TUNING

CHECKS = {
    "2x700 GQA2": dict(B=2, T=700, H=8, Hkv=4),
    "1x4096": dict(B=1, T=4096, H=4, Hkv=4),
    "1x16384": dict(B=1, T=16384, H=4, Hkv=4),
}


def _errors() -> dict:
    out = {}
    for name, shape in CHECKS.items():
        torch.manual_seed(0)
        errs = check_against_reference(**shape)
        out[name] = {k: float(v) for k, v in errs.items()}
    return out


def _times(shapes) -> dict:
    out = {}
    for B, T in shapes:
        torch.manual_seed(1)
        inputs = _inputs(B, T, 32, 128, 128, 64, torch.bfloat16)
        do = torch.randn_like(inputs[0])

        def fwd(inputs=inputs):
            return kernels.gsa_chunk_triton(*inputs)[0]

        out[f"{B}x{T}"] = {"fwd_ms": round(_bench(fwd), 3), "fwdbwd_ms": round(_bench(_fwd_bwd(fwd, inputs, do)), 3)}
        torch.cuda.empty_cache()
    return out


def fla_errors(B=1, T=4096, H=4, K=128, V=128, M=64) -> dict:
    """FLA's chunk_gsa against the same fp32 reference (bf16 inputs, no initial state)."""
    from t2r.kernels.reference import gsa_chunk

    chunk_gsa = _fla()[0]
    torch.manual_seed(0)
    q, k, v, s, g = _inputs(B, T, H, K, V, M, torch.bfloat16)
    do = torch.randn(B, T, H, V, device="cuda")
    results = []
    for impl in ("fla", "ref"):
        xs = [q, k, v, s, g] if impl == "fla" else [x.detach().float().requires_grad_() for x in (q, k, v, s, g)]
        o = chunk_gsa(*xs, scale=K**-0.5)[0] if impl == "fla" else gsa_chunk(*xs, None)[0]
        results.append([o, *torch.autograd.grad((o.float() * do).sum(), xs)])
    names = ["o", "dq", "dk", "dv", "ds", "dg"]
    return {n: rel_err(a, b) for n, a, b in zip(names, *results, strict=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", action="append", help="comma-separated groups in half precision (repeat)")
    ap.add_argument("--shape", action="append", help="BxT timing shapes (default 8x2048, 2x8192, 1x16384)")
    ap.add_argument("--json")
    args = ap.parse_args()
    groups = kernels.PREC_GROUPS
    subsets = [tuple(x.split(",")) if x else () for x in args.subset] if args.subset else [
        c for r in range(len(groups) + 1) for c in itertools.combinations(groups, r)
    ]  # fmt: skip
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shape or ["8x2048", "2x8192", "1x16384"]]
    rows = []

    def record(row: dict) -> None:  # written after every row, so that a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)

    for subset in subsets:
        TUNING.dot = "half:" + ",".join(subset) if subset else "tf32"
        row = {"half": list(subset), "errors": _errors(), "times": _times(shapes)}
        row["max_err"] = max(v for e in row["errors"].values() for v in e.values())
        row["max_dg_err"] = max(e["dg"] for e in row["errors"].values())
        record(row)
    if _fla()[0] is not None:  # last: FLA autotunes on first use
        record({"impl": "fla chunk_gsa", "errors": {"1x4096": fla_errors()}})


if __name__ == "__main__":
    main()
