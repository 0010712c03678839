"""benchmarks/kernel_resources.py: every Triton kernel compiles for sm_90 on a machine without a GPU, and the
table reports its registers and spills (the check to run before spending GPU time on a kernel change)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_compiles_for_sm90_and_reports_its_registers():
    # A process of its own: the other tests load Triton in interpreter mode, which a real compile cannot share.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("_")]
    names = {row.split()[0] for row in rows}
    assert {"_out_fwd_kernel", "_slot_probs_kernel", "_out_blocks_kernel", "_slot_grads_kernel", "_bwd_sweep_kernel",
            "_gate_grad_kernel", "_state_scan_kernel", "_decode_kernel", "_decode_step_kernel", "_rms_norm_kernel",
            "_rotary_kernel", "_window_part_kernel", "_window_merge_kernel", "_rms_norm_bwd_kernel",
            "_prologue_kernel", "_prologue_bwd_kernel", "_swiglu_kernel", "_swiglu_bwd_kernel", "_ce_fwd_kernel",
            "_ce_bwd_kernel", "_kd_fwd_kernel", "_kd_bwd_kernel", "_grouped_linear_kernel",
            "_decode_keys_kernel", "_decode_values_kernel"} <= names  # fmt: skip
    assert all("REG:" in row and "not compiled" not in row for row in rows), rows
    decode = next(row for row in rows if row.startswith("_decode_kernel"))
    assert "STACK:0 " in decode  # the decode step must not spill: it is bound by its state's bandwidth


def test_a_real_steps_launches_are_recorded_with_the_hosts_settings_and_compiled(tmp_path):
    """benchmarks/launch_resources.py: the kernels a SmolLM2-shaped layer's training step launches, each with the
    block sizes and precisions the host code picks there (not the interpreter's emulated ones), compiled for sm_90."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "launches.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "launch_resources.py"), "--seq", "256", "--tuning",
           "scan_parts=2", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    launches = {}
    for row in rows:
        assert row["resources"].startswith("REG:"), row
        assert row["compile_s"] > 0, row  # timed in an empty cache: a cached compile would take no time
        launches[row["kernel"]] = launches.get(row["kernel"], 0) + row["launches"]
    # one layer: four norms (input, the GSA output's, post-attention, final) and the GSA op's forward and backward
    assert launches["_rms_norm_kernel"] == 4 and launches["_rms_norm_bwd_kernel"] == 4
    assert launches["_state_parts_kernel"] == launches["_state_carry_kernel"] == 3  # the three scans, in parts
    assert "_state_scan_kernel" not in launches
    # The part count is a runtime argument: packed rows whose longest document changes it compile nothing new.
    parts = [row for row in rows if row["kernel"] in ("_state_parts_kernel", "_state_carry_kernel")]
    assert parts and not any({"parts", "PARTS"} & set(row["constexprs"]) for row in parts)
    probs = next(row for row in rows if row["kernel"] == "_slot_probs_kernel")
    assert probs["constexprs"]["K"] == 64 and probs["constexprs"]["H"] == 9 and probs["constexprs"]["Hkv"] == 3
    assert probs["constexprs"]["PREC_IN"] == 0  # bf16 products, as on a GPU (the interpreter's would be emulated)


def test_the_grouped_projection_compiles_for_one_row():
    """Triton turns an integer argument equal to 1 into a constexpr: at batch 1 the grouped projection's row count M
    arrives as a Python int, which a tensor method on it (``M.to``) broke on a GPU though the interpreter ran it."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks')\n"
        "from kernel_resources import signature, resources_of\n"
        "from t2r.kernels.grouped_linear import _grouped_linear_kernel as fn\n"
        "for ones in ((), ('M',), ('M', 'N0', 'K')):\n"
        "    sig, consts = signature(fn)\n"
        "    types = {n: t for n, t in sig.items() if t != 'constexpr' and n not in ones}\n"
        "    consts.update({n: 1 for n in ones}, BM=16, BN=32, BK=128, PREC=0)\n"
        "    print(ones, resources_of(fn, types, consts, 4, 1))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("REG:") == 3 and "not compiled" not in proc.stdout, proc.stdout
