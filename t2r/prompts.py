"""Synthetic long-context prompts shared by evaluation and conversion: a passkey hidden in filler text at spread
depths (``t2r eval``'s retrieval test; ``t2r convert --full-attention-layers auto:N`` reads the teacher's retrieval
heads on them)."""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompts(tokenizer, context: int, trials: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(prompt, key, depth) with a random 5-digit key at evenly spread depths; about ``context`` tokens."""
    rng = random.Random(f"{seed}-{context}")
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    fixed = len(
        tokenizer(
            INTRO + QUESTION + "The pass key is 00000. Remember it. 00000 is the pass key.\n", add_special_tokens=False
        ).input_ids
    )
    reps = max(1, (context - fixed) // per_filler)
    prompts = []
    for i in range(trials):
        key = str(rng.randint(10000, 99999))
        depth = (i + 0.5) / trials
        before = round(reps * depth)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
        prompts.append((INTRO + FILLER * before + needle + FILLER * (reps - before) + QUESTION, key, depth))
    return prompts
