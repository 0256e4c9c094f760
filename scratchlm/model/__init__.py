"""Model stage: one decoder-only transformer for the GPT-2 and Llama families."""

from scratchlm.model.config import ModelConfig
from scratchlm.model.model import GPT, KVCache, count_params, flops_per_token
from scratchlm.model.presets import PRESETS, get_preset

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "count_params", "flops_per_token", "get_preset"]
