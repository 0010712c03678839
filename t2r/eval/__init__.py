"""Evaluation: held-out perplexity by position, passkey retrieval, zero-shot tasks; the teacher beside."""
