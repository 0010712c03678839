"""The decoder layer's neighbours inside the grouped projections' launch (``TUNING.fused_maps``), one fusion at a
time: the RMSNorm before the q/k/v/gates and the gate/up maps, the MLP's activation in the gate/up launch, the
residual after the output and down maps. Each fused call against the same work as separate launches (our RMSNorm and
SwiGLU kernels, torch's add, the plain grouped launch), at SmolLM2-135M's and Mistral-7B's shapes for 1 and 16 rows
(``--rows``), with and without programmatic dependent launches (``TUNING.pdl``), and the fused calls over a few
launch geometries. Each fused call is checked against the reference (relative error); all are timed from one CUDA
graph over copies of the weights that together outgrow L2 (t2r.bench.kernels.graphed_ms), as in grouped_tiles.py.
Needs a GPU.

Usage: python benchmarks/gpu/grouped_neighbours.py [--rows 1 16] [--json out.json]"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from sweeps import rel_err, report

from t2r.bench.kernels import copies, graphed_ms
from t2r.kernels import grouped_linear as grouped_module
from t2r.kernels.grouped_linear import grouped_linear_triton
from t2r.kernels.norm import rms_norm_triton
from t2r.kernels.reference import grouped_linear_reference
from t2r.kernels.swiglu import swiglu_triton
from t2r.kernels.tuning import TUNING

# (model, fusion): (hidden size K, output sizes, norm before, activation, residual after)
CALLS = {
    ("smollm2-135m", "q/k/v/gates + norm"): (576, (576, 192, 192, 192), True, False, False),
    ("smollm2-135m", "gate/up + norm + act"): (576, (1536, 1536), True, True, False),
    ("smollm2-135m", "o_proj + residual"): (576, (576,), False, False, True),
    ("smollm2-135m", "down + residual"): (1536, (576,), False, False, True),
    ("mistral-7b", "q/k/v/gates + norm"): (4096, (4096, 1024, 1024, 512), True, False, False),
    ("mistral-7b", "gate/up + norm + act"): (4096, (14336, 14336), True, True, False),
    ("mistral-7b", "down + residual"): (14336, (4096,), False, False, True),
}
GEOMETRIES = [None, (16, 256, 2), (16, 128, 2), (32, 128, 2), (16, 128, 4), (32, 128, 4), (16, 64, 4), (32, 64, 4)]


def separate(x, weights, biases, norm, glu, residual):
    """The same work as the launches before the fusion: norm kernel, plain grouped launch, activation kernel, add."""
    if norm is not None:
        x = rms_norm_triton(x, *norm)
    out = grouped_linear_triton(x, weights, biases)
    if glu:
        out = (swiglu_triton(*out),)
    return out if residual is None else (residual + out[0],)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="rows (decoding's batch) of each call")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows_out = []
    for ((model, fusion), (K, sizes, has_norm, glu, has_res)), M in itertools.product(CALLS.items(), args.rows):
        dev, dt = "cuda", torch.bfloat16
        x = torch.randn(M, K, device=dev, dtype=dt)
        norm = (torch.rand(K, device=dev, dtype=dt) + 0.5, 1e-5) if has_norm else None
        residual = torch.randn(M, sizes[0], device=dev, dtype=dt) if has_res else None
        sets = [tuple(torch.randn(n, K, device=dev, dtype=dt) / K**0.5 for n in sizes)
                for _ in range(copies(K * sum(sizes) * 2, most=256))]  # fmt: skip
        biases = (None,) * len(sizes)
        kw = dict(norm=norm, glu=glu, residual=residual)
        want = grouped_linear_reference(x, sets[0], biases, **kw)
        for dependent in (False, True):
            TUNING.pdl = dependent
            grouped_module.GROUPED_GEOMETRY = None
            base = graphed_ms([lambda w=w: separate(x, w, biases, **kw) for w in sets])  # noqa: B023
            for geo in GEOMETRIES if not dependent else GEOMETRIES[:1]:
                grouped_module.GROUPED_GEOMETRY = geo
                got = grouped_linear_triton(x, sets[0], biases, **kw)
                err = max(rel_err(a, b) for a, b in zip(got, want, strict=True))
                ms = graphed_ms([lambda w=w: grouped_linear_triton(x, w, biases, **kw) for w in sets])  # noqa: B023
                shown = geo or grouped_module.geometry(sum(sizes[:1] if glu else sizes), M, x.device, glu)
                label = "auto " + str(shown) if geo is None else str(geo)
                rows_out.append({"model": model, "fusion": fusion, "rows": M, "pdl": dependent, "geometry": label,
                                 "ms": round(ms, 5), "separate_ms": round(base, 5), "speedup": round(base / ms, 3),
                                 "rel_err": err})  # fmt: skip
                print(json.dumps(rows_out[-1]), flush=True)
    TUNING.pdl, grouped_module.GROUPED_GEOMETRY = False, None
    report(rows_out, ("model", "fusion", "rows", "pdl"), args.json)


if __name__ == "__main__":
    main()
