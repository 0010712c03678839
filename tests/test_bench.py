"""`t2r bench ... --record FILE` appends the run as measured to a markdown log; --json keeps the rows."""

import json

from conftest import run_cli


def test_bench_record_appends_the_run_to_a_markdown_log(tiny_converted, tmp_path, capsys, monkeypatch):
    import t2r.bench.throughput

    monkeypatch.setattr(t2r.bench.throughput, "device_name", lambda device: f"named from {device}")
    log, out = tmp_path / "benchmarks.md", tmp_path / "rows.json"
    log.write_text("# Benchmarks\n\nearlier notes\n")
    args = ["bench", "train", str(tiny_converted), "--device", "cpu", "--seq", "16", "--batch", "1", "--steps", "1"]
    for seq in ("16", "24"):
        code, _ = run_cli([*args[:5], "--seq", seq, *args[7:], "--json", str(out), "--record", str(log)], capsys)
        assert code == 0
    text = log.read_text()
    assert text.startswith("# Benchmarks\n\nearlier notes\n\n### `t2r bench train ")
    sections = text.split("### `t2r bench train ")[1:]
    assert len(sections) == 2 and "--seq 16" in sections[0] and "--seq 24" in sections[1]
    assert "(named from cpu, " in sections[1].splitlines()[0]  # the device the run was given
    assert json.loads(out.read_text())["device"] == "named from cpu"
    rows = json.loads(out.read_text())["rows"]  # the second run's rows, also in its section as a table
    assert [r["model"] for r in rows] == ["GSA (full)", "teacher SDPA (full)"] and rows[0]["seq"] == 24
    table = [line for line in sections[1].splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(rows[0]) + " |" and table[1] == "|" + "---|" * len(rows[0])
    assert table[2:] == ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]


def test_bench_train_switches_the_fusions_and_the_reference_in_one_run(tiny_converted, monkeypatch):
    """--fusions times the student a second time with the training fusions switched, --reference with the PyTorch
    path: each row runs under its own settings (read at each call, not from the environment at import)."""
    import t2r.bench.throughput as tp
    from t2r.kernels.tuning import TRAINING_FUSIONS, TUNING

    seen = []

    def measure(model, batch, seq, steps, label):
        seen.append((label, tuple(getattr(TUNING, name) for name in TRAINING_FUSIONS), TUNING.impl))
        return {"model": label}

    monkeypatch.setattr(tp, "train_throughput", measure)
    monkeypatch.setattr(TUNING, "fused_norm_grad", False)
    monkeypatch.setattr(TUNING, "impl", "auto")
    default = tuple(getattr(TUNING, name) for name in TRAINING_FUSIONS)
    tp.run_train_bench(str(tiny_converted), None, [16], 1, 1, False, "meta", reference=True, fusions=True)
    assert seen == [("GSA (full)", default, "auto"), ("GSA (full, fusions on)", (True,) * 4, "auto"),
                    ("GSA, reference path (full)", default, "reference"),
                    ("teacher SDPA (full)", default, "auto")]  # fmt: skip


def test_bench_kernels_times_the_decode_step_at_the_batch_sizes_asked(monkeypatch, tmp_path, capsys):
    """The decode step at batch 1, 16 and 64 by default (the issue's sizes), others with --decode-batch, and
    --no-train skips the training kernels; the record then holds the decode table only."""
    import t2r.bench.kernels

    calls = []

    def run(shapes, fla, batches):
        calls.append((shapes, fla, list(batches)))
        return {"device": "dev", "rel_error_vs_reference": {}, "rel_error_vs_reference_16k": {}, "fla": fla,
                "copy_bandwidth_TBps": 1.0, "train": [{"B": 1, "T": 8}] if shapes else [],
                "decode": [{"B": b, "ours_step_ms": 0.01} for b in batches]}  # fmt: skip

    monkeypatch.setattr(t2r.bench.kernels, "run_kernel_bench", run)
    monkeypatch.setattr("t2r.bench.throughput.device_name", lambda device: "dev")
    assert run_cli(["bench", "kernels", "--no-fla"], capsys)[0] == 0
    record = tmp_path / "r.md"
    args = ["bench", "kernels", "--no-train", "--decode-batch", "4", "--decode-batch", "8", "--record", str(record)]
    assert run_cli(args, capsys)[0] == 0
    assert calls[0][1:] == (False, [1, 16, 64]) and calls[0][0]
    assert calls[1] == ([], True, [4, 8])
    tables = [line for line in record.read_text().splitlines() if line.startswith("| ")]
    assert tables[0].startswith("| B | ours_step_ms") and len(tables) == 3


def test_bench_output_that_is_a_directory_fails_before_the_run(tiny_converted, tmp_path, capsys, monkeypatch):
    import t2r.bench.throughput

    def measure(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output was checked")

    monkeypatch.setattr(t2r.bench.throughput, "run_train_bench", measure)
    for option in ("--record", "--json"):
        code, lines = run_cli(["bench", "train", str(tiny_converted), "--device", "cpu", option, str(tmp_path)], capsys)
        assert code == 1 and lines == [f"t2r: error: {tmp_path} is a directory; give a file to write the results to"]


def test_records_name_the_device_the_benchmark_ran_on(tmp_path, monkeypatch):
    """A `--device cpu` run on a GPU machine is a CPU measurement: its record must not carry the GPU's name."""
    import platform

    import torch

    from t2r.bench.throughput import write_outputs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    names = {}
    for device in ("cpu", "cuda", "cuda:0", None):
        out = tmp_path / f"{device}.json"
        write_outputs([{"x": 1}], out, None, "t2r bench train", device=device)
        names[device] = json.loads(out.read_text())["device"]
    assert names == {"cpu": platform.processor() or platform.machine() or "cpu", "cuda": "Fake GPU",
                     "cuda:0": "Fake GPU", None: "Fake GPU"}  # fmt: skip


def test_bench_generate_times_both_models_and_states_the_ratio(tiny_converted, tmp_path, capsys):
    """Per (batch, context): GSA and the teacher, one row per mode, and a ratio row against the faster teacher;
    --end-to-end goes through generate() and adds the teacher's static cache."""
    for extra, labels in (
        ([], {"GSA (eager)", "teacher SDPA (default)"}),
        (["--end-to-end"], {"GSA (eager)", "teacher SDPA (default)", "teacher SDPA, static cache (compiled on CUDA)"}),
    ):
        out, log = tmp_path / f"rows{len(extra)}.json", tmp_path / f"log{len(extra)}.md"
        args = ["bench", "generate", str(tiny_converted), "--device", "cpu", "--context", "12", "--context", "20",
                "--batch", "2", "--new-tokens", "8", "--json", str(out), "--record", str(log), *extra]  # fmt: skip
        code, _ = run_cli(args, capsys)
        assert code == 0
        rows = json.loads(out.read_text())["rows"]
        assert {r["model"] for r in rows} == labels
        assert {(r["batch"], r["context"]) for r in rows} == {(2, 12), (2, 20)}
        assert all(r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 for r in rows)
        assert all(r["first_call_s"] >= 0 for r in rows) if extra else all("first_call_s" not in r for r in rows), rows
        ratios = [line for line in log.read_text().splitlines() if line.startswith("| 2 |")]
        assert "| GSA / best teacher |" in log.read_text() and len(ratios) == 2


def test_end_to_end_needs_two_new_tokens(tiny_converted, capsys):
    args = ["bench", "generate", str(tiny_converted), "--device", "cpu", "--new-tokens", "1", "--end-to-end"]
    code, lines = run_cli(args, capsys)
    assert code != 0 and len(lines) == 1 and "at least 2" in lines[0]
