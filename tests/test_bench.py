"""`t2r bench ... --record FILE` appends the run as measured to a markdown log; --json keeps the rows."""

import json

import pytest
import torch
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

    def measure(model, batch, seq, steps, label, profile, graphs=False):
        seen.append((label, tuple(getattr(TUNING, name) for name in TRAINING_FUSIONS), TUNING.impl))
        return {"model": label, "seq": seq, "tokens_per_s": 100.0}

    monkeypatch.setattr(tp, "train_throughput", measure)
    monkeypatch.setattr(TUNING, "fused_norm_grad", False)
    monkeypatch.setattr(TUNING, "impl", "auto")
    default = tuple(getattr(TUNING, name) for name in TRAINING_FUSIONS)
    variants = ["fused_mlp=1,save_probs=1"]
    tp.run_train_bench(str(tiny_converted), None, [16], 1, 1, False, "meta", reference=True, fusions=True,
                       variants=variants)  # fmt: skip
    mlp = tuple(name == "fused_mlp" or flag for name, flag in zip(TRAINING_FUSIONS, default, strict=True))
    assert seen == [("GSA (full)", default, "auto"), ("GSA (full, fusions on)", (True,) * 4, "auto"),
                    ("GSA (full, fused_mlp=1,save_probs=1)", mlp, "auto"),
                    ("GSA, reference path (full)", default, "reference"),
                    ("teacher SDPA (full)", default, "auto")]  # fmt: skip
    seen.clear()
    for name in TRAINING_FUSIONS:  # all on (the defaults): the second row has them off
        monkeypatch.setattr(TUNING, name, True)
    tp.run_train_bench(str(tiny_converted), None, [16], 1, 1, False, "meta", fusions=True)
    assert seen[:2] == [("GSA (full)", (True,) * 4, "auto"), ("GSA (full, fusions off)", (False,) * 4, "auto")]


def test_bench_train_states_each_rows_ratio_to_the_teacher():
    """Tokens/s ratios per sequence length, and GPU-busy ratios where profiled (the ceiling without host time)."""
    from t2r.bench.throughput import teacher_ratios

    rows = teacher_ratios([
        {"model": "GSA (full)", "seq": 16, "tokens_per_s": 300, "gpu_ms": 4.0},
        {"model": "teacher SDPA (full)", "seq": 16, "tokens_per_s": 400, "gpu_ms": 5.0},
        {"model": "GSA (full)", "seq": 32, "tokens_per_s": 500},
        {"model": "teacher SDPA (full)", "seq": 32, "tokens_per_s": 250},
        {"model": "GSA + LoRA r8 (ckpt)", "seq": 64, "tokens_per_s": 9},
    ])  # fmt: skip
    assert [(r.get("x_teacher"), r.get("gpu_x_teacher")) for r in rows] == [
        (0.75, 1.25), (1.0, 1.0), (2.0, None), (1.0, None), (None, None)
    ]  # fmt: skip


def test_a_profile_sums_the_gpus_busy_time_and_sorts_kernels_into_families():
    """Overlapping kernels count once in the busy time, each in full in its family; per step."""
    from t2r.bench.profile import busy_summary, family

    kernels = [  # (name, start us, end us), two steps' worth
        ("_state_scan_kernel", 0, 1000),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 500, 2000),  # overlaps the scan
        ("_rms_norm_kernel", 3000, 3200),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", 4000, 5000),
        ("triton_poi_fused_add_mul_0", 5000, 5400),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 6000, 6200),
    ]
    summary = busy_summary(kernels, steps=2)
    top = summary.pop("top_kernels")
    assert summary == {
        "gpu_ms": 1.9, "kernels": 3, "gsa_ms": 0.5, "t2r_ms": 0.1, "attention_ms": 0.5, "gemm_ms": 0.75,
        "inductor_ms": 0.2, "other_ms": 0.1,
    }  # fmt: skip
    assert top[0] == {"kernel": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "family": "gemm",
                      "ms": 0.75, "calls": 0.5}  # fmt: skip
    assert [k["kernel"] for k in top[1:3]] == ["_state_scan_kernel", "pytorch_flash::flash_fwd_kernel"]
    assert top[-1]["kernel"] == "vectorized_elementwise_kernel" and len(top) == len(kernels)
    assert family("_bwd_rev_memories_kernel") == "gsa" and family("_decode_step_kernel") == "t2r"
    assert family("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT") == "gemm" and family("Memcpy DtoD") == "other"
    assert busy_summary([], steps=1)["gpu_ms"] == 0


def test_a_profile_finds_the_hosts_time_in_our_autograd_functions():
    """The autograd engine's wrapper and the backward node nested in it count once; other host events not at all."""
    from t2r.bench.profile import host_summary
    from t2r.kernels import norm  # noqa: F401  (defines _RMSNormFunction)

    events = [  # (name, start us, end us), two steps' worth
        ("_GSAFunction", 0, 300),
        ("aten::mm", 100, 200),  # inside the op: part of its time already
        ("aten::add", 400, 500),
        ("autograd::engine::evaluate_function: _GSAFunctionBackward", 1000, 1600),
        ("_GSAFunctionBackward", 1050, 1550),
        ("autograd::engine::evaluate_function: _RMSNormFunctionBackward", 2000, 2100),
        ("autograd::engine::evaluate_function: MmBackward0", 2100, 2400),
        ("_OtherFunction", 3000, 4000),
    ]
    assert host_summary(events, steps=2) == {"t2r_host_ms": 0.5}
    assert host_summary([], steps=1) == {"t2r_host_ms": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="profiles the GPU's kernels")
def test_a_profiled_training_step_finds_the_gsa_kernels_and_the_gpus_busy_time():
    from t2r.bench.throughput import shaped_model, train_throughput

    model = shaped_model("smollm2-135m", device="cuda")
    row = train_throughput(model, batch=1, seq=256, steps=1, warmup=1, profile=2)
    assert 0 < row["gpu_ms"] <= row["profiled_step_ms"] and row["kernels"] > 30 * 10
    assert row["gsa_ms"] > 0 and row["gemm_ms"] > 0 and row["attention_ms"] == 0  # GSA layers: no softmax attention
    assert 0 < row["t2r_host_ms"] < row["profiled_step_ms"] and row["host_ms"] > 0


def test_bench_train_refuses_a_bad_variant_before_it_runs(tiny_converted, capsys):
    from conftest import run_cli

    code, err = run_cli(["bench", "train", str(tiny_converted), "--device", "cpu", "--tuning", "segment=48"], capsys)
    assert code == 1 and err == ["t2r: error: --tuning 'segment=48': T2R_GSA_SEGMENT=48: expected a power of two >= 16"]


def test_bench_train_profile_needs_a_gpu(tiny_converted, capsys):
    from conftest import run_cli

    code, err = run_cli(["bench", "train", str(tiny_converted), "--device", "cpu", "--profile", "2"], capsys)
    message = "t2r: error: --profile measures the GPU's busy time; the run is on 'cpu': give a CUDA device"
    assert code == 1 and err == [message]


def test_bench_kernels_times_the_decode_step_at_the_batch_sizes_asked(monkeypatch, tmp_path, capsys):
    """The decode step at batch 1, 16 and 64 by default (the issue's sizes), others with --decode-batch, and
    --no-train skips the training kernels; the record then holds the decode table only."""
    import t2r.bench.kernels

    calls = []

    def run(shapes, fla, batches, layers, losses):
        calls.append((shapes, fla, list(batches), list(layers), list(losses)))
        return {"device": "dev", "rel_error_vs_reference": {}, "rel_error_vs_reference_16k": {}, "fla": fla,
                "copy_bandwidth_TBps": 1.0, "train": [{"B": 1, "T": 8}] if shapes else [],
                "decode": [{"B": b, "ours_step_ms": 0.01} for b in batches],
                "loss": [{"tokens": n, "vocab": v} for n, v in losses]}  # fmt: skip

    monkeypatch.setattr(t2r.bench.kernels, "run_kernel_bench", run)
    monkeypatch.setattr("t2r.bench.throughput.device_name", lambda device: "dev")
    assert run_cli(["bench", "kernels", "--no-fla"], capsys)[0] == 0
    record = tmp_path / "r.md"
    args = ["bench", "kernels", "--no-train", "--decode-batch", "4", "--decode-batch", "8", "--no-loss", "--record",
            str(record)]  # fmt: skip
    assert run_cli(args, capsys)[0] == 0
    assert calls[0][1:] == (False, [1, 16, 64], ["issue"], t2r.bench.kernels.LOSS_SHAPES) and calls[0][0]
    assert calls[1] == ([], True, [4, 8], ["issue"], [])
    assert run_cli(["bench", "kernels", "--layer", "smollm2-135m", "--layer", "mistral-7b"], capsys)[0] == 0
    assert calls[2][3] == ["smollm2-135m", "mistral-7b"]  # real models' GQA shapes
    code, err = run_cli(["bench", "kernels", "--layer", "gpt2"], capsys)
    assert code == 1 and err == ["t2r: error: --layer gpt2: expected one of issue, smollm2-135m, mistral-7b"]
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
                "--batch", "2", "--new-tokens", "16", "--json", str(out), "--record", str(log), *extra]  # fmt: skip
        code, err = run_cli(args, capsys)
        assert code == 0
        rows = json.loads(out.read_text())["rows"]
        assert {r["model"] for r in rows} == labels
        progress = [json.loads(line) for line in err if line.startswith("{")]  # each row on stderr when measured
        assert [(r["model"], r["context"]) for r in progress] == [(r["model"], r["context"]) for r in rows]
        assert {(r["batch"], r["context"]) for r in rows} == {(2, 12), (2, 20)}
        assert all(r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 for r in rows)
        assert all(r["first_call_s"] >= 0 for r in rows) if extra else all("first_call_s" not in r for r in rows), rows
        ratios = [line for line in log.read_text().splitlines() if line.startswith("| 2 |")]
        assert "| GSA / best teacher |" in log.read_text() and len(ratios) == 2
        # each row states its step's bytes (the teacher's grow with the context, GSA's do not), the ratio row theirs
        step = {(r["model"].startswith("teacher"), r["context"]): r["step_mb"] for r in rows}
        assert step[False, 12] == step[False, 20] and step[True, 12] < step[True, 20]
        assert "| bytes ratio |" in log.read_text() and all(line.count("x |") >= 2 for line in ratios)


def test_end_to_end_needs_two_new_tokens(tiny_converted, capsys):
    args = ["bench", "generate", str(tiny_converted), "--device", "cpu", "--new-tokens", "1", "--end-to-end"]
    code, lines = run_cli(args, capsys)
    assert code != 0 and len(lines) == 1 and "at least 2" in lines[0]


def test_a_failing_profiler_keeps_the_rows_timings(tiny_converted, monkeypatch):
    """The profile comes after the timed steps: if the profiler itself fails, the row keeps what was measured."""
    import t2r.bench.profile
    from t2r.bench.throughput import train_throughput
    from t2r.models.loading import load_converted

    def broken(step, steps):
        raise RuntimeError("CUPTI could not be initialised\nmore detail")

    monkeypatch.setattr(t2r.bench.profile, "profile_steps", broken)
    row = train_throughput(load_converted(tiny_converted), batch=1, seq=16, steps=1, warmup=0, profile=2)
    assert row["tokens_per_s"] > 0 and row["profile_error"] == "CUPTI could not be initialised"
    assert 0 < row["host_ms"] <= row["step_s"] * 1e3 * 1.5  # one step timed: its issue time is (about) its time


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_a_decoding_steps_floor_counts_weights_once_and_each_layers_cache(arch):
    """Weights (tied ones once), keys and values over the context (the teacher's sliding window caps them where its
    cache does), fp32 memories read and written, a hybrid layer's window; a layer kept as softmax attention is
    counted as the teacher's."""
    from conftest import tiny_gsa_model

    from t2r.bench.floors import decode_step_bytes
    from t2r.teacher import teacher_view

    window = 6
    overrides = dict(num_hidden_layers=3, sliding_window=40, tie_word_embeddings=True)
    if arch == "qwen2":
        overrides["use_sliding_window"] = False  # Qwen2's window is off unless asked for: its cache keeps all
    student = tiny_gsa_model(arch, teacher_overrides=overrides, gsa_window=window, gsa_full_attention_layers=[2])
    config = student.config
    assert config.gsa_window == window and not config.is_gsa_layer(2)
    D, Hkv, M, L = config.attention_head_dim, config.num_key_value_heads, config.gsa_num_slots, config.num_hidden_layers
    weights = sum(p.numel() * 4 for p in student.parameters())
    assert student.lm_head.weight is student.model.embed_tokens.weight
    teacher = teacher_view(student)
    kv = 2 * Hkv * D * 4
    for B, T in ((1, 16), (3, 100)):
        span = min(T, 40) if arch == "mistral" else T
        memories = 2 * Hkv * (D * M + M * D) * 4  # the keys' and the values' memories, read and written
        gsa_layer = memories + kv * window
        assert decode_step_bytes(student, B, T) == weights + B * (2 * gsa_layer + kv * (span + 1))
        teacher_weights = sum(p.numel() * 4 for p in teacher.parameters())
        assert decode_step_bytes(teacher, B, T) == teacher_weights + B * L * kv * (span + 1)


def test_tables_leave_a_profiles_kernel_list_to_the_json(capsys):
    from t2r.bench.throughput import markdown_table, print_table

    rows = [{"model": "GSA", "gpu_ms": 1.5, "top_kernels": [{"kernel": "k", "ms": 1.0}]}, {"model": "teacher"}]
    print_table(rows)
    assert capsys.readouterr().out.splitlines()[0].split() == ["model", "|", "gpu_ms"]
    assert markdown_table(rows).splitlines()[2] == "| GSA | 1.5 |"


def test_bench_train_graphs_times_every_row_again_as_one_cuda_graph(tiny_converted, monkeypatch):
    """--graphs: each row (the teacher's too) again with its step replayed as a graph, right after its eager
    timing; graphed rows take their ratio to the graphed teacher, and a capture that failed keeps its error
    through the rounds without a ratio."""
    import t2r.bench.throughput as tp

    calls = []

    def measure(model, batch, seq, steps, label, profile, graphs=False):
        calls.append((label, graphs))
        head = {"model": label, "seq": seq} | ({"graphs": True} if graphs else {})
        if graphs and label.startswith("GSA (full, fusions"):
            return head | {"graphs_error": "operation not permitted when stream is capturing"}
        step = {"GSA (full)": 0.2, "teacher SDPA (full)": 0.3}.get(label.replace(", graphs", ""), 0.1) / (
            4 if graphs else 1
        )
        return head | {"step_s": step, "tokens_per_s": round(seq / step)}

    monkeypatch.setattr(tp, "train_throughput", measure)
    monkeypatch.setattr(tp, "check_graphs", lambda device: None)
    rows = tp.run_train_bench(str(tiny_converted), None, [16], 1, 1, False, "meta", fusions=True, graphs=True,
                              rounds=2)  # fmt: skip
    labels = ["GSA (full", "GSA (full, fusions off", "teacher SDPA (full"]
    modes = (("", False), (", graphs", True))
    one_round = [(f"{label}{mode})", graphed) for label in labels for mode, graphed in modes]
    assert calls == one_round * 2
    by = {r["model"]: r for r in rows}
    for mode in ("", ", graphs"):
        student, teacher = by[f"GSA (full{mode})"], by[f"teacher SDPA (full{mode})"]
        assert student["x_teacher"] == round(student["tokens_per_s"] / teacher["tokens_per_s"], 3)
    assert by["GSA (full, graphs)"]["tokens_per_s"] == 4 * by["GSA (full)"]["tokens_per_s"]
    assert by["teacher SDPA (full, graphs)"]["x_teacher"] == 1.0
    failed = by["GSA (full, fusions off, graphs)"]
    assert failed["graphs_error"].startswith("operation not permitted") and failed["rounds"] == 2
    assert "x_teacher" not in failed


def test_bench_train_graphs_needs_a_gpu(tiny_converted, capsys):
    code, err = run_cli(["bench", "train", str(tiny_converted), "--device", "cpu", "--graphs"], capsys)
    assert code == 1 and err == ["t2r: error: --graphs captures CUDA graphs; the run is on 'cpu': give a CUDA device"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_a_graphed_training_step_updates_the_weights_as_the_eager_one_does():
    """Replays of one captured step (forward, backward, AdamW) against as many eager steps from the same weights
    and batch: the same updates, so the timed replays do the work the eager rows do. (A graphed run warms up
    eagerly before the capture, then replays warmup + steps times.)"""
    import copy

    from conftest import rel_err

    from t2r.bench.throughput import shaped_model, train_throughput

    eager = shaped_model("smollm2-135m", device="cuda", dtype=torch.float32)
    eager.config.num_hidden_layers = 2
    eager.model.layers = eager.model.layers[:2]
    graphed = copy.deepcopy(eager)
    before = torch.cat([p.detach().flatten() for p in eager.parameters()])
    torch.manual_seed(0)
    row = train_throughput(graphed, batch=1, seq=256, steps=3, warmup=2, graphs=True)
    assert "graphs_error" not in row and row["graphs"] and row["step_s"] > 0
    torch.manual_seed(0)
    train_throughput(eager, batch=1, seq=256, steps=5, warmup=2)  # 7 updates, as the graphed run made
    moved = [torch.cat([p.detach().flatten() for p in m.parameters()]) - before for m in (graphed, eager)]
    assert moved[1].norm() > 0 and rel_err(*moved) <= 5e-2


def test_a_captured_teachers_attention_stays_causal_without_a_mask(monkeypatch):
    """Under capture transformers cannot read tensors back: it assumes packed rows, and 5.17 also refuses SDPA's
    causal skip, so the teacher's captured step built a [T, T] mask (2x slower, 2x the memory at 16k on an H200).
    Capture is simulated here by transformers' own tracing test; inside ``dense_rows`` the teacher's SDPA calls
    get no mask (is_causal), outside it they get one, and a padded batch keeps its mask either way."""
    from transformers import LlamaConfig, LlamaForCausalLM, masking_utils

    from t2r.bench.graphed import dense_rows

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask is not None)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    monkeypatch.setattr(masking_utils, "is_tracing", lambda *args, **kwargs: True)
    ids = torch.randint(0, 64, (2, 12))
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    with torch.no_grad():  # no cache, as in training
        model(input_ids=ids, use_cache=False)
        with dense_rows():
            model(input_ids=ids, use_cache=False)
            model(input_ids=ids, attention_mask=padded, use_cache=False)
        model(input_ids=ids, use_cache=False)
    assert masks == [True, False, True, True]
    assert masking_utils.is_tracing() is True and "causal_skip" not in repr(masking_utils._ignore_causal_mask_sdpa)


def test_bench_train_rounds_take_turns_and_report_each_rows_median(tiny_converted, monkeypatch):
    """--rounds 3: student and teacher alternate (a drifting host slows all rows alike), each row reports its
    median round with the rounds' spread, and only the last round is profiled."""
    import t2r.bench.throughput as tp

    times = iter([0.30, 0.20, 0.10, 0.40, 0.50, 0.20])  # round by round: student, teacher
    calls = []

    def measure(model, batch, seq, steps, label, profile, graphs=False):
        step = next(times)
        calls.append((label, profile))
        row = {"model": label, "seq": seq, "step_s": step, "tokens_per_s": round(seq / step)}
        return row | ({"gpu_ms": 50.0 if label.startswith("GSA") else 40.0} if profile else {})

    monkeypatch.setattr(tp, "train_throughput", measure)
    monkeypatch.setattr("t2r.bench.profile.check_profile", lambda device: None)
    rows = tp.run_train_bench(str(tiny_converted), None, [16], 1, 1, False, "meta", profile=2, rounds=3)
    assert calls == [("GSA (full)", 0), ("teacher SDPA (full)", 0)] * 2 + [
        ("GSA (full)", 2),
        ("teacher SDPA (full)", 2),
    ]
    student, teacher = rows
    assert (student["step_s"], student["rounds"], student["spread"], student["gpu_ms"]) == (0.3, 3, 1.333, 50.0)
    assert (teacher["step_s"], teacher["spread"], teacher["gpu_ms"]) == (0.2, 1.0, 40.0)
    assert student["x_teacher"] == round(student["tokens_per_s"] / teacher["tokens_per_s"], 3)
    assert tp.median_rounds([{"model": "a", "step_s": 2.0}, {"model": "a", "step_s": 1.0}])[0]["step_s"] == 1.0


def test_bench_train_rounds_from_the_command_line(tiny_converted, tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["bench", "train", str(tiny_converted), "--device", "cpu", "--seq", "16", "--batch", "1", "--steps", "1"]
    code, err = run_cli([*args, "--rounds", "2", "--json", str(out)], capsys)
    rows = json.loads(out.read_text())["rows"]
    assert code == 0 and [(r["model"], r["rounds"]) for r in rows] == [("GSA (full)", 2), ("teacher SDPA (full)", 2)]
    # Each round's row reached stderr as it was measured (a run cut by a time limit keeps them).
    progress = [json.loads(line) for line in err if line.startswith("{")]
    assert [r["model"] for r in progress] == ["GSA (full)", "teacher SDPA (full)"] * 2
    assert all(r["step_s"] > 0 for r in progress)
    assert all(r["spread"] >= 0 and r["host_ms"] > 0 for r in rows)
    code, err = run_cli([*args, "--rounds", "0"], capsys)
    assert code == 2 and any("--rounds" in line for line in err)  # refused before anything is built


def test_bench_kernels_runs_every_row_on_the_cpu_at_a_tiny_layer(monkeypatch, tmp_path, capsys):
    """The whole `t2r bench kernels` run (correctness checks, training rows with and without kept buffers, decode
    rows at two batch sizes, the loss chunked and fused, ratios, tables, JSON) on the CPU through Triton's
    interpreter, so that a broken row fails here rather than on a GPU call (a positional mix-up in the decode rows
    once cost one)."""
    import json

    import t2r.bench.kernels as kernels
    from t2r.kernels.cross_entropy import cross_entropy_sum_triton

    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    monkeypatch.setitem(kernels.LAYERS, "tiny", (4, 2, 16, 16))
    small = dict(H=4, Hkv=2, K=16, V=16, M=16)
    monkeypatch.setattr(kernels, "CHECKS", {"rel_error_vs_reference": dict(B=1, T=70, **small),
                                            "rel_error_vs_reference_16k": dict(B=1, T=130, **small)})  # fmt: skip
    monkeypatch.setattr(kernels, "LOSS_SHAPES", [(40, 300)])
    fused = []
    monkeypatch.setattr("t2r.kernels.dispatch.cross_entropy_sum_triton",
                        lambda *a, f=cross_entropy_sum_triton: fused.append(1) or f(*a))  # fmt: skip
    out = tmp_path / "k.json"
    args = ["bench", "kernels", "--no-fla", "--layer", "tiny", "--shape", "1x96", "--decode-batch", "1",
            "--decode-batch", "3", "--json", str(out)]  # fmt: skip
    code, err = run_cli(args, capsys)
    assert code == 0, err
    errors, train, *rest = json.loads(out.read_text())["rows"]
    decode, (loss,) = rest[:2], rest[2:]
    assert set(errors) == set(kernels.CHECKS)
    for check in errors.values():
        assert set(check) == {"o", "hk", "hv", "dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"}
        assert all(float(e) < 2e-2 for e in check.values()), check  # bf16 kernels against the fp32 reference
    assert (train["layer"], train["B"], train["T"]) == ("tiny", 1, 96)
    for key in ("ours_fwd_ms", "ours_fwdbwd_ms", "ours_keep_fwdbwd_ms", "sdpa_fwd_ms", "sdpa_fwdbwd_ms"):
        assert train[key] > 0, key
    assert "fla_fwd_ms" not in train and "sdpa/ours_fwdbwd" in train and train["fwd_floor_ms"] > 0
    assert [row["B"] for row in decode] == [1, 3]
    for row in decode:
        assert row["layer"] == "tiny" and row["H"] == 4 and "fla_step_ms" not in row
        assert row["ours_step_ms"] > 0 and row["kv_cache_32k_ms"] > 0 and row["state_floor_ms"] > 0
        assert row["launch_ms"] > 0
    # the loss, chunked against fused (which ran: the Triton kernels, not the reference again)
    assert (loss["tokens"], loss["vocab"]) == (40, 300) and fused
    assert float(loss["rel_err_loss"]) < 1e-5 and float(loss["rel_err_grad"]) < 1e-2
    assert loss["chunked_fwdbwd_ms"] > 0 and loss["fused_fwdbwd_ms"] > 0 and loss["floor_ms"] > 0


def test_decode_ratios_take_gsa_fastest_mode_against_the_fastest_teacher():
    """Seen on an H200: the hybrid's compiled step (5,441 tokens/s) was slower than its plain captured step (6,690)
    and the ratio row reported the compiled one. Each cell's ratio is GSA's fastest mode over the fastest teacher,
    naming the mode; OOM rows are no one's best."""
    from t2r.bench.throughput import GSA_COMPILED, GSA_EAGER, GSA_GRAPHS, decode_ratios

    def rows(batch, **tokens_per_s):
        return [{"model": m, "batch": batch, "context": 64, "tokens_per_s": v} for m, v in tokens_per_s.items()]

    cells = rows(1, **{GSA_COMPILED: 500, GSA_GRAPHS: 700, GSA_EAGER: 100, "teacher A": 70, "teacher B": "OOM"})
    cells += rows(16, **{GSA_COMPILED: 900, GSA_GRAPHS: 800, "teacher A": "OOM"})
    cells += rows(64, **{GSA_GRAPHS: "OOM", "teacher A": 10})
    one, sixteen, sixty_four = decode_ratios(cells)
    assert (one["GSA tokens/s"], one["GSA mode"], one["GSA / best teacher"]) == (700, GSA_GRAPHS, "10.00x")
    assert one["graphs / eager"] == "7.00x"
    assert (sixteen["GSA mode"], sixteen["GSA / best teacher"]) == (GSA_COMPILED, "teacher OOM")
    assert sixty_four["GSA tokens/s"] is None and "GSA / best teacher" not in sixty_four


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays CUDA graphs")
def test_graphed_timing_replays_every_call_in_turn_and_copies_outgrow_l2(monkeypatch):
    """Each call once to warm up, then the captured sequence (the calls repeated to at least min_calls) replayed once
    to settle and ``rounds`` times timed: every call's own counter says how often it ran."""
    from t2r.bench import kernels

    monkeypatch.setattr(kernels, "DEVICE", "cuda")
    counters = [torch.zeros((), device="cuda") for _ in range(3)]
    ms = kernels.graphed_ms([lambda c=c: c.add_(1) for c in counters], min_calls=7, rounds=5)
    assert ms > 0 and [c.item() for c in counters] == [1 + 3 * (1 + 5)] * 3  # 7 calls -> 3 rounds of the 3
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    assert kernels.copies(l2) == 4 and kernels.copies(1, most=10) == 10 and kernels.copies(100 * l2) == 1
