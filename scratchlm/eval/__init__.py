"""Evaluation: language-modelling scores (perplexity, bits per byte), multiple-choice,
generation and classification tasks, the lm-evaluation-harness adapter, side-by-side comparison."""
