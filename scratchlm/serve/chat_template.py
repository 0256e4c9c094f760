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

A template is a program from a model file, so a render is bounded (`RenderLimits`): a budget of
steps (loop iterations and calls), a wall-clock limit, and a cap on the length of the text and of
every string or list built on the way. Jinja's sandbox only stops templates from reaching Python
internals; nested loops, recursive macros or string doubling would otherwise run for hours or fill
the memory. A single filter call (`center`, `format`) can still allocate what its argument asks.
"""

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

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


class ChatTemplateError(ConfigError):
    """The model's chat template is not valid Jinja, failed, or ran over its step or time limit:
    a fault of the model's template, not of the conversation."""


class ChatTemplateRefusal(ChatTemplateError):
    """The template called `raise_exception`: it does not accept this conversation (a role it
    does not know, turns that do not alternate, ...)."""


class ChatTooLongError(ChatTemplateError):
    """The conversation renders to a text (or builds a string) longer than the render may make."""


@dataclass(frozen=True)
class RenderLimits:
    """What one render of a chat template may spend. The defaults leave a wide margin: a
    1024-message conversation takes about 1,000 steps through SmolLM2's template and 2,000
    through one that loops and calls per message, in 10 to 20 ms."""

    max_steps: int = 100_000  # loop iterations and calls: 0.05 to 0.5 s of Jinja, by the step's kind
    max_seconds: float = 2.0  # a backstop for steps that are slow, such as calls on long strings
    max_chars: int = 10_000_000  # the rendered text, and any string or list built on the way


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
    raise ChatTemplateRefusal(f"chat: the model's chat template refused the conversation: {message}")


# ---- the bounded render --------------------------------------------------------------------------
_BUDGET = "_render_budget"  # the render variable that carries the budget to the hooks below
_COUNTED, _SIZED = "_render_counted", "_render_sized"  # filters wrapped around loops and `~`
MAX_INT_BITS = 4096  # integers a template computes: enough for any real template, no 9 ** 9999999
MAX_CALL_NUMBER = 10_000_000  # an argument of a call: `'x'.ljust(n)` allocates n characters first


class _Budget:
    """What is left of one render's `RenderLimits`."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits, self.steps = limits, limits.max_steps
        self.deadline = time.monotonic() + limits.max_seconds

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise ChatTemplateError(f"chat: the model's chat template took more than {self.limits.max_steps:,} steps "
                                    "(loop iterations and calls) for this conversation; the template is broken")
        self.check_time()

    def check_time(self) -> None:
        # >=: a limit of 0 s stops at the first step, whatever the clock's resolution
        if time.monotonic() >= self.deadline:
            raise ChatTemplateError(f"chat: the model's chat template took longer than {self.limits.max_seconds:g} s "
                                    "for this conversation; the template is broken")

    def check_size(self, size: int) -> None:
        if size > self.limits.max_chars:
            raise ChatTooLongError(f"chat: the conversation renders to more than {self.limits.max_chars:,} characters "
                                   "with the model's chat template; shorten it")

    def sized(self, value: Any) -> Any:
        if isinstance(value, str | list | tuple):
            self.check_size(len(value))
        return value


def _budget(context: Context) -> _Budget:
    budget = context.get(_BUDGET)
    if not isinstance(budget, _Budget):  # the template assigned the name: fail closed
        raise ChatTemplateError(f"chat: the model's chat template replaced the variable {_BUDGET}")
    return budget


def _counted_items(budget: _Budget, iterable: Iterable) -> Iterator:
    for item in iterable:
        budget.step()
        yield item


@jinja2.pass_context
def _counted(context: Context, iterable: Iterable) -> Iterator:
    return _counted_items(_budget(context), iterable)


@jinja2.pass_context
def _sized(context: Context, value: Any) -> Any:
    return _budget(context).sized(value)


def _check_operands(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse `left operator right` before Python computes it when the result would be over the
    size cap (a sequence) or MAX_INT_BITS (an integer)."""
    sequences = str | list | tuple
    if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
        budget.check_size(len(left) + len(right))
    elif operator == "*" and isinstance(left, sequences) and isinstance(right, int):
        budget.check_size(len(left) * right)
    elif operator == "*" and isinstance(right, sequences) and isinstance(left, int):
        budget.check_size(len(right) * left)
    elif isinstance(left, int) and isinstance(right, int) and operator in ("*", "**"):
        bits = left.bit_length() + right.bit_length() if operator == "*" else left.bit_length() * max(right, 0)
        if bits > MAX_INT_BITS:
            raise ChatTemplateError(f"chat: the model's chat template computes a number of more than "
                                    f"{MAX_INT_BITS} bits")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox with every call counted, and `+`, `*` and `**` checked before they run."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's names
        budget = _budget(__context)
        budget.step()
        if any(isinstance(v, int) and v > MAX_CALL_NUMBER for v in (*args, *kwargs.values())):
            # `'x'.ljust(10 ** 12)`: refused before it allocates
            raise ChatTemplateError(f"chat: the model's chat template passes a number over {MAX_CALL_NUMBER:,} "
                                    "to a call")
        if isinstance(__obj, LoopContext) and args:  # `loop(children)` of a recursive loop
            args = (_counted_items(budget, args[0]), *args[1:])
        return budget.sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget(context)
        _check_operands(budget, operator, left, right)
        return budget.sized(super().call_binop(context, operator, left, right))


class _CountLoops(NodeTransformer):
    """Every `{% for %}` iterates through `_counted` and every `~` result goes through `_sized`:
    the two things the sandbox's hooks never see."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _COUNTED, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return nodes.Filter(node, _SIZED, [], [], None, None, lineno=node.lineno)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The environment transformers renders templates in, so prompts match it byte for byte.
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters.update({"tojson": _tojson, _COUNTED: _counted, _SIZED: _sized})
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        tree = _CountLoops().visit(env.parse(template))
        tree.set_environment(env)
        return env.from_string(tree)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"chat: the model's chat template is not valid Jinja: {error}") from None


def _token_text(tokenizer: Tokenizer, key: str) -> str:
    token_id = tokenizer.metadata.get(key)
    return tokenizer.decode([int(token_id)]) if token_id is not None else ""


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True, *,
                limits: RenderLimits = RenderLimits()) -> str:
    """The prompt text for `messages` (dicts with 'role' and 'content'), ending with the opening
    of the assistant's turn when `add_generation_prompt`. Encode it with special tokens allowed.
    Any failure of the template is a ChatTemplateError: ChatTemplateRefusal when it refuses the
    conversation, ChatTooLongError when the text would pass `limits.max_chars`."""
    template = _compile(chat_template(tokenizer))
    budget = _Budget(limits)
    variables = {
        "messages": check_messages(messages),
        "add_generation_prompt": add_generation_prompt,
        "bos_token": _token_text(tokenizer, "bos_token_id"),
        "eos_token": _token_text(tokenizer, "eos_token_id"),
        _BUDGET: budget,
    }
    pieces, size = [], 0
    try:
        for piece in template.generate(variables):  # piece by piece: a runaway output stops at the cap
            size += len(piece)
            budget.check_size(size)
            budget.check_time()
            pieces.append(piece)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"chat: the model's chat template failed: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever a model's template does wrong is its error, not a crash
        raise ChatTemplateError(f"chat: the model's chat template failed: {type(error).__name__}: {error}") from None
    return "".join(pieces)


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Token ids that end an assistant's reply: end of sequence, and the end-of-turn token of
    the common templates when the tokenizer has it."""
    ids = [tokenizer.eos_id, *(tokenizer.special_tokens.get(t) for t in END_OF_TURN_TOKENS)]
    return tuple(dict.fromkeys(i for i in ids if i is not None))
