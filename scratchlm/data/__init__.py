"""Data stage: corpora, cleaning, deduplication, mixing and token shards."""
