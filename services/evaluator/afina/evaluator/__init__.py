"""afina evaluator: scores the base, fine-tuned and exported models of a job on its held-out examples."""
