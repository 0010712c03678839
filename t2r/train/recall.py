"""Synthetic long-range recall rows mixed into training data.

A GSA model only keeps what its slot memories are trained to keep. Ordinary text rarely asks for an exact
token string seen thousands of tokens earlier, so a converted model learns to forget it (see passkey retrieval
in docs/results.md). A recall row is a corpus row with a few "facts" (a name and a random number) written at
random depths and, at the end, a question whose answer is one of those numbers: the LM loss on the answer
tokens rewards carrying the number through the memory. The wording deliberately differs from the passkey
evaluation (t2r.prompts), so the evaluation still measures transfer, not a memorised template.
"""

from __future__ import annotations

import hashlib

import numpy as np

from t2r.errors import T2RError
from t2r.train.data import PackedRows

COLORS = ("red", "blue", "green", "amber", "violet", "silver", "black", "white", "golden", "grey", "orange", "teal")
ANIMALS = ("otter", "falcon", "badger", "heron", "lynx", "beetle", "walrus", "gecko", "moose", "raven", "koala")


def _rng(seed: int, row: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"t2r-recall:{seed}:{row}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def recall_texts(rng: np.random.Generator, max_facts: int = 3) -> tuple[list[str], str, str]:
    """(fact sentences, question, answer): 1..max_facts distinct names with 4-7 digit numbers."""
    n = int(rng.integers(1, max_facts + 1))
    names = set()
    while len(names) < n:
        names.add(f"{COLORS[rng.integers(len(COLORS))]} {ANIMALS[rng.integers(len(ANIMALS))]}")
    names = sorted(names)
    numbers = [str(int(rng.integers(10 ** (d - 1), 10**d))) for d in rng.integers(4, 8, size=n)]
    facts = [f" Note: the {name} has the number {num}. " for name, num in zip(names, numbers, strict=True)]
    pick = int(rng.integers(n))
    return facts, f" Question: which number does the {names[pick]} have? Answer:", f" {numbers[pick]}."


def recall_row(ids: np.ndarray, tokenizer, rng: np.random.Generator) -> tuple[np.ndarray, int] | None:
    """The row with facts written over its tokens at random depths and the question + answer at its end, and
    the number of answer tokens (the row's last); None when the row is too short to hold them."""
    facts, question, answer = recall_texts(rng)
    question_ids, answer_ids, *pieces = tokenizer([question, answer, *facts], add_special_tokens=False)["input_ids"]
    tail = question_ids + answer_ids
    room = len(ids) - len(tail)
    stretch = room // len(pieces)  # one stretch of [0, room) per fact: the spans never overlap
    if max(map(len, pieces)) > stretch // 2:
        return None
    out = ids.copy()
    out[room:] = tail
    for i, piece in enumerate(pieces):
        start = i * stretch + int(rng.integers(0, stretch - len(piece) + 1))
        out[start : start + len(piece)] = piece
    return out, len(answer_ids)


def add_recall_rows(
    rows: PackedRows, tokenizer, fraction: float, seed: int, answer_weight: float = 1.0
) -> tuple[PackedRows, int]:
    """A copy of ``rows`` in which a deterministic ``fraction`` of rows (chosen by hash of seed and row index)
    became recall rows, each one document so that no reset clears the memory between fact and question.
    ``answer_weight`` != 1 scales the loss on the answer tokens: they are a few tokens of 2k, so at weight 1
    the memory barely feels them. Returns the rows and how many were rewritten."""
    if fraction <= 0:
        return rows, 0
    ids, starts = rows.input_ids.copy(), rows.doc_start.copy()
    weight = None if answer_weight == 1 else np.ones(ids.shape, dtype=np.float32)
    selected = changed = 0
    for r in range(len(ids)):
        rng = _rng(seed, r)
        if rng.random() >= fraction:
            continue
        selected += 1
        task = recall_row(ids[r], tokenizer, rng)
        if task is None:
            continue
        ids[r], n_answer = task
        starts[r] = False
        starts[r, 0] = True  # one document: no memory reset between the facts and the question
        if weight is not None:
            weight[r, -n_answer:] = answer_weight
        changed += 1
    if selected and not changed:
        raise T2RError(f"data.recall_fraction: rows of {rows.seq_len} tokens are too short to hold a recall task")
    return PackedRows(ids, starts, weight), changed
