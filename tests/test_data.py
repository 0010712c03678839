"""Corpora through datasets: formats, packing with document boundaries, held-out split, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import corpus_text, rel_err, tiny_gsa_model, tiny_tokenizer

from t2r.errors import T2RError
from t2r.train.data import (
    IGNORE_INDEX,
    load_documents,
    pack_documents,
    positions_from_starts,
    split_rows,
    tokenize_documents,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_formats_globs_dirs_and_saved_datasets(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n" + json.dumps({"body": "third"}))
    datasets.Dataset.from_dict({"body": ["fourth", "fifth"]}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"body": ["sixth"]}).save_to_disk(str(tmp_path / "saved"))
    docs = load_documents(
        [str(tmp_path / "a.txt"), str(tmp_path / "sub"), str(tmp_path / "*.parquet"), str(tmp_path / "saved")],
        text_field="body",
    )
    assert docs["text"] == ["first document\nwith two lines\n", "second", "third", "fourth", "fifth", "sixth"]


def test_packing_keeps_document_boundaries(tok):
    import datasets

    docs = datasets.Dataset.from_dict({"text": ["alpha beta gamma " * 7, "delta " * 3, "epsilon zeta " * 20]})
    tokens = tokenize_documents(docs, tok)
    lengths = [len(x) for x in tokens["input_ids"]]
    assert all(x[-1] == tok.eos_token_id for x in tokens["input_ids"])
    rows = pack_documents(tokens, seq_len=16)
    assert len(rows) == sum(lengths) // 16
    flat_starts = np.flatnonzero(rows.doc_start.reshape(-1))
    doc_offsets = np.cumsum([0, *lengths[:-1]])
    row_offsets = np.arange(len(rows)) * 16
    expect = sorted(set(doc_offsets[doc_offsets < len(rows) * 16]) | set(row_offsets))
    assert flat_starts.tolist() == expect
    batch = rows.batch([0, 1])
    assert batch["position_ids"][0, 0] == 0
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["position_ids"] > 0] == batch["input_ids"][batch["position_ids"] > 0]).all()


def test_positions_restart_at_document_starts():
    starts = torch.tensor([[True, False, False, True, False], [True, True, False, False, False]])
    assert positions_from_starts(starts).tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]


@torch.no_grad()
def test_packed_rows_do_not_leak_between_documents(tok):
    """Through the real pipeline: editing one document never changes another document's logits."""
    import datasets

    texts = [corpus_text(60, 0), corpus_text(500, 9000), corpus_text(400, 20000)]
    rows = pack_documents(tokenize_documents(datasets.Dataset.from_dict({"text": texts}), tok), seq_len=96)
    row = rows.batch([0])
    starts = torch.from_numpy(rows.doc_start[0]).nonzero().squeeze(-1).tolist()
    assert len(starts) >= 2, "the test needs a row holding two documents"
    model = tiny_gsa_model("llama", teacher_overrides={"vocab_size": len(tok)})
    first_end = starts[1]
    base = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits
    edited = row["input_ids"].clone()
    edited[0, :first_end] = torch.randint(3, len(tok), (first_end,))
    after = model(input_ids=edited, position_ids=row["position_ids"]).logits
    # equal up to float rounding (the reference picks its chunk size from all gates in the call)
    assert rel_err(after[0, first_end:], base[0, first_end:]) <= 1e-6
    assert rel_err(after[0, :first_end], base[0, :first_end]) > 1e-2


def test_hash_split_is_disjoint_and_stable(tok):
    import datasets

    docs = datasets.Dataset.from_dict({"text": [corpus_text(20_000)]})
    rows = pack_documents(tokenize_documents(docs, tok), seq_len=32)
    train, held = split_rows(rows, 0.1)
    assert len(train) + len(held) == len(rows) and len(held) > 0
    train_set = {r.tobytes() for r in train.input_ids}
    assert not any(r.tobytes() in train_set for r in held.input_ids)
    _, again_held = split_rows(rows.select(np.arange(len(rows))[::-1]), 0.1)
    assert {r.tobytes() for r in again_held.input_ids} == {r.tobytes() for r in held.input_ids}


def test_non_utf8_text_gets_a_clear_error_or_replacement(tmp_path):
    path = tmp_path / "cp1252.txt"
    path.write_bytes(b"It\x92s a dictionary entry.\n")
    with pytest.raises(T2RError, match=r"is not valid UTF-8 .* set data.encoding_errors=replace"):
        load_documents([str(path)])
    assert load_documents([str(path)], encoding_errors="replace")["text"] == ["It\ufffds a dictionary entry.\n"]


@pytest.mark.parametrize("case", ["nofiles", "empty", "field", "seqlen", "missing"])
def test_bad_data(tmp_path, tok, case):
    import datasets

    if case == "nofiles":
        with pytest.raises(T2RError, match="no data files match"):
            load_documents([str(tmp_path / "*.txt")])
    elif case == "missing":
        with pytest.raises(T2RError, match="not found"):
            load_documents([str(tmp_path / "nope.txt")])
    elif case == "empty":
        (tmp_path / "e.txt").write_text("   \n\n")
        with pytest.raises(T2RError, match="is empty"):
            load_documents([str(tmp_path / "e.txt")])
    elif case == "field":
        (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
        with pytest.raises(T2RError, match="has no field 'text'"):
            load_documents([str(tmp_path / "x.jsonl")])
    else:
        tokens = tokenize_documents(datasets.Dataset.from_dict({"text": ["short text"]}), tok)
        with pytest.raises(T2RError, match="larger than the whole corpus"):
            pack_documents(tokens, seq_len=4096)
