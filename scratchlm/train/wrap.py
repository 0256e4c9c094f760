"""Wrappers applied to a model from outside (torchtitan's order: checkpointing, then compile,
then data parallel); the model file itself knows nothing of them."""

import torch
from torch.utils.checkpoint import checkpoint

from scratchlm.model.model import GPT


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in the backward pass instead of storing them: about
    a third more compute for memory that no longer grows with depth."""
    for block in model.blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed
