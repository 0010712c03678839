"""Synthetic recall rows: deterministic, answerable from an earlier fact, worded unlike the passkey eval."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from conftest import corpus_text, tiny_tokenizer

from t2r.errors import T2RError
from t2r.train.data import pack_documents, tokenize_documents
from t2r.train.recall import add_recall_rows, recall_texts


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    docs = datasets.Dataset.from_dict({"text": [corpus_text(40_000, offset=i * 40_000) for i in range(3)]})
    return pack_documents(tokenize_documents(docs, tok), seq_len=512)


def test_texts_are_deterministic_and_the_answer_is_one_of_the_facts():
    a, b = (recall_texts(np.random.default_rng(7)) for _ in range(2))
    assert a == b
    for seed in range(50):
        facts, question, answer = recall_texts(np.random.default_rng(seed))
        number = answer.strip(" .")
        assert 4 <= len(number) <= 7 and number.isdigit()
        holder = [f for f in facts if f" {number}." in f]
        assert holder and question.split("does the ")[1].split(" have")[0] in holder[0]
        assert "pass key" not in " ".join(facts) + question  # not the evaluation's template


def test_rows_get_facts_before_the_question_and_stay_one_document(tok, rows):
    new, changed = add_recall_rows(rows, tok, 0.3, seed=1)
    again, _ = add_recall_rows(rows, tok, 0.3, seed=1)
    assert np.array_equal(new.input_ids, again.input_ids) and new.input_ids.shape == rows.input_ids.shape
    touched = np.flatnonzero((new.input_ids != rows.input_ids).any(1))
    assert changed == len(touched) and 0.15 * len(rows) < changed < 0.45 * len(rows)
    for r in touched:
        text = tok.decode(new.input_ids[r].tolist())
        head, _, asked = text.rpartition(" Question: which number does the ")
        name = asked.split(" have")[0]  # the tiny tokenizer drops "?"
        number = asked.rsplit("Answer: ", 1)[1].strip(" .")
        assert f"the {name} has the number {number}." in head
        assert new.doc_start[r, 0] and not new.doc_start[r, 1:].any()
    untouched = np.setdiff1d(np.arange(len(rows)), touched)
    assert np.array_equal(new.doc_start[untouched], rows.doc_start[untouched])
    assert add_recall_rows(rows, tok, 0.0, seed=1)[0] is rows


def test_rows_too_short_for_a_task_are_an_error(tok, rows):
    short = type(rows)(rows.input_ids[:, :40].copy(), rows.doc_start[:, :40].copy())
    with pytest.raises(T2RError, match="too short to hold a recall task"):
        add_recall_rows(short, tok, 1.0, seed=0)


def test_answer_weight_marks_exactly_the_answer_tokens(tok, rows):
    plain, _ = add_recall_rows(rows, tok, 0.3, seed=1)
    new, changed = add_recall_rows(rows, tok, 0.3, seed=1, answer_weight=5.0)
    assert plain.weight is None and np.array_equal(new.input_ids, plain.input_ids)
    heavy = new.weight != 1
    assert set(np.unique(new.weight)) == {1.0, 5.0} and heavy.any(1).sum() == changed
    for r in np.flatnonzero(heavy.any(1)):
        k = int(heavy[r].sum())
        assert heavy[r, -k:].all()  # the row's last tokens, and only those
        answer = tok.decode(new.input_ids[r, -k:].tolist()).strip(" .")
        assert answer.isdigit() and tok.decode(new.input_ids[r, :-k].tolist()).endswith("Answer:")
    batch = new.select(np.arange(4)).batch([0, 1, 2])
    assert torch.equal(batch["label_weights"], torch.from_numpy(new.weight[:3]))


def test_weighted_losses_scale_each_labels_term():
    from t2r.train.losses import ce_loss_sum, kd_loss_sum

    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 9, 13), torch.randn(2, 9, 13)
    labels = torch.randint(0, 13, (2, 9))
    labels[1, 4] = -100
    weights = torch.ones(2, 9)
    assert torch.allclose(ce_loss_sum(logits, labels, weights), ce_loss_sum(logits, labels))
    assert torch.allclose(kd_loss_sum(logits, teacher, labels, 2.0, weights), kd_loss_sum(logits, teacher, labels, 2.0))
    weights[0, 3] = 4.0  # the loss of predicting labels[0, 3] from position 2
    one = torch.nn.functional.cross_entropy(logits[0, 2], labels[0, 3])
    assert torch.allclose(ce_loss_sum(logits, labels, weights), ce_loss_sum(logits, labels) + 3 * one)
    log_s, log_t = torch.log_softmax(logits[0, 2] / 2, -1), torch.log_softmax(teacher[0, 2] / 2, -1)
    kl = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="sum")
    expect = kd_loss_sum(logits, teacher, labels, 2.0) + 3 * kl * 4
    assert torch.allclose(kd_loss_sum(logits, teacher, labels, 2.0, weights, chunk=5), expect)


def test_recall_probe_script_scores_a_model(tiny_converted, corpus_files, monkeypatch, capsys):
    """A model that reads the fact back scores 1.0; rows too short for a task are a one-line exit."""
    import json
    import runpy
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_converted)

    class Oracle(torch.nn.Module):
        def generate(self, ids, max_new_tokens, do_sample):
            text = tok.decode(ids[0].tolist())
            name = text.rpartition(" Question: which number does the ")[2].split(" have")[0]
            number = text.split(f"the {name} has the number ")[1].split(".")[0]
            return torch.cat([ids, torch.tensor([tok(f" {number}.", add_special_tokens=False)["input_ids"]])], 1)

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "recall_probe.py"
    args = [str(script), str(tiny_converted), corpus_files[0], "--rows", "3", "--seq", "1024"]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Oracle())
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {"model": str(tiny_converted), "rows": 3, "seq": 1024, "recall_acc": 1.0}
    monkeypatch.setattr(sys, "argv", [*args[:-1], "40"])
    with pytest.raises(SystemExit, match="too short to hold a recall task"):
        runpy.run_path(str(script), run_name="__main__")
