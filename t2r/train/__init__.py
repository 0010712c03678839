"""Finetuning: recipes, corpora, losses, the teacher's attention beside the student, the stage loop, checkpoints
and runs."""
