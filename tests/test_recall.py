"""Synthetic recall rows: deterministic, answerable from an earlier fact, worded unlike the passkey eval."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from conftest import corpus_text, tiny_tokenizer

from t2r.data import pack_documents, tokenize_documents
from t2r.errors import T2RError
from t2r.recall import add_recall_rows, recall_texts


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
