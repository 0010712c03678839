"""The teacher's bytes per decoding step over GSA's, from the real shapes alone (meta tensors, no weights, no GPU):
the speed-up both would show at their memory floor (t2r/bench/floors.py). Usage: python benchmarks/decode_floors.py"""

from __future__ import annotations

import torch

from t2r.bench.floors import decode_step_bytes
from t2r.bench.throughput import SHAPES, print_table
from t2r.models.configuration_t2r import T2R_CONFIGS
from t2r.models.modeling_t2r import T2R_MODELS
from t2r.teacher import teacher_view


def meta_model(shape: str, window: int) -> torch.nn.Module:
    fields = dict(SHAPES[shape])
    hybrid = dict(gsa_window=window, gsa_window_mix_per_token=True, gsa_window_sink=True) if window else {}
    config = T2R_CONFIGS[fields.pop("architecture")](**fields, gsa_num_slots=64, **hybrid)
    with torch.device("meta"):
        model = T2R_MODELS[type(config)](config).to(torch.bfloat16)
    model.tie_weights()
    return model


def main() -> None:
    rows = []
    for shape in SHAPES:
        for window in (0, 512):
            model = meta_model(shape, window)
            teacher = teacher_view(model)
            for batch in (1, 16, 64):
                for context in (1024, 8192, 32768, 131072):
                    gsa, soft = decode_step_bytes(model, batch, context), decode_step_bytes(teacher, batch, context)
                    rows.append({"shape": shape, "window": window, "batch": batch, "context": context,
                                 "GSA GB": round(gsa / 1e9, 3), "teacher GB": round(soft / 1e9, 3),
                                 "bytes ratio": round(soft / gsa, 2)})  # fmt: skip
    print_table(rows)


if __name__ == "__main__":
    main()
