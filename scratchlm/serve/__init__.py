"""Serve stage: turning a trained model into text. `sampling` holds the one sampling
implementation that `generate`, `chat` and the HTTP server share."""

from scratchlm.serve.sampling import (
    FINISHED,
    CompletionStream,
    SamplingConfig,
    Utf8StreamDecoder,
    apply_repetition_penalty,
    encode_prompt,
    filter_logits,
    fit_context,
    generate_text,
    generate_tokens,
    sample_next,
)

__all__ = [
    "FINISHED",
    "CompletionStream",
    "SamplingConfig",
    "Utf8StreamDecoder",
    "apply_repetition_penalty",
    "encode_prompt",
    "filter_logits",
    "fit_context",
    "generate_text",
    "generate_tokens",
    "sample_next",
]
