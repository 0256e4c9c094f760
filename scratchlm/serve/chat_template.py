"""Chat templates: a conversation (a list of messages) as the one prompt string a model was
trained to continue.

A model imported from GGUF or Hugging Face brings its own template, a Jinja program kept in
`tokenizer.metadata["chat_template"]`; it is rendered here the way `transformers` renders it
(sandboxed Jinja, `trim_blocks` and `lstrip_blocks`, `raise_exception` available), so a prompt is
byte for byte the one the model was fine-tuned on. A model trained here gets ChatML, whose
`<|im_start|>` and `<|im_end|>` are special tokens of every tokenizer `scratchlm` trains.

A reply ends at the model's end-of-sequence token or at the end-of-turn token the template
closes each message with (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, ...);
`chat_stop_ids` lists them.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from scratchlm.errors import ConfigError
from scratchlm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# Tokens that close a turn in the templates of common open models: ChatML, Llama 3, Gemma, Phi-3.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_template(tokenizer: Tokenizer) -> str:
    """The model's own template, else ChatML when the tokenizer has its two tokens."""
    own = tokenizer.metadata.get("chat_template")
    if own:
        return own
    if {"<|im_start|>", "<|im_end|>"} <= tokenizer.special_tokens.keys():
        return CHATML_TEMPLATE
    raise ConfigError(
        "chat: the model has no chat template and its tokenizer lacks the ChatML tokens <|im_start|> and <|im_end|>; "
        "use `scratchlm generate` for plain text completion"
    )


def check_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as plain dicts of a known role and string content, or one ConfigError that
    names the first bad message."""
    if not messages:
        raise ConfigError("chat: messages is empty; give at least one message")
    checked = []
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(f"chat: message {n} is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(f"chat: message {n} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConfigError(f"chat: message {n} has no text content")
        checked.append({"role": role, "content": content})
    return checked


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training
    masks in transformers; rendering a prompt only needs its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # transformers' tojson: Jinja's own escapes <, >, & and non-ASCII and sorts keys, which
    # changes the prompt of templates that embed tool schemas.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ConfigError(f"chat: the model's chat template refused the conversation: {message}")


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The environment transformers renders templates in, so prompts match it byte for byte.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as error:
        raise ConfigError(f"chat: the model's chat template is not valid Jinja: {error}") from None


def _token_text(tokenizer: Tokenizer, key: str) -> str:
    token_id = tokenizer.metadata.get(key)
    return tokenizer.decode([int(token_id)]) if token_id is not None else ""


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` (dicts with 'role' and 'content'), ending with the opening
    of the assistant's turn when `add_generation_prompt`. Encode it with special tokens allowed."""
    template = _compile(chat_template(tokenizer))
    try:
        return template.render(
            messages=check_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=_token_text(tokenizer, "bos_token_id"),
            eos_token=_token_text(tokenizer, "eos_token_id"),
        )
    except jinja2.TemplateError as error:
        raise ConfigError(f"chat: the model's chat template failed: {error}") from None


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Token ids that end an assistant's reply: end of sequence, and the end-of-turn token of
    the common templates when the tokenizer has it."""
    ids = [tokenizer.eos_id, *(tokenizer.special_tokens.get(t) for t in END_OF_TURN_TOKENS)]
    return tuple(dict.fromkeys(i for i in ids if i is not None))
