"""Compression: making a trained model cheaper to run (pruning here; quantized inference layers
live in scratchlm/model/quantize.py)."""
