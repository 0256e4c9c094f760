"""Serve stage: turning a trained model into text. `sampling` holds the one sampling
implementation that `generate`, `chat` and the HTTP server share; `chat_template` turns a
conversation into a prompt; `engine` runs concurrent requests as one batch."""

from scratchlm.serve.sampling import (
    FINISHED,
    Completion,
    CompletionStream,
    DecodeBatch,
    SamplingConfig,
    TokenStep,
    Utf8StreamDecoder,
    apply_frequency_penalties,
    apply_repetition_penalty,
    encode_prompt,
    filter_logits,
    fit_context,
    fit_prompt,
    generate,
    generate_text,
    generate_tokens,
    sample_next,
)

__all__ = [
    "FINISHED",
    "Completion",
    "CompletionStream",
    "DecodeBatch",
    "SamplingConfig",
    "TokenStep",
    "Utf8StreamDecoder",
    "apply_frequency_penalties",
    "apply_repetition_penalty",
    "encode_prompt",
    "filter_logits",
    "fit_context",
    "fit_prompt",
    "generate",
    "generate_text",
    "generate_tokens",
    "sample_next",
]
