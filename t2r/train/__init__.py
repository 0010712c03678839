"""Finetuning: recipes, corpora, objectives, the stage loop, checkpoints and runs."""
