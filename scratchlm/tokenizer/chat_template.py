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
steps, a wall-clock limit, and a cap on sizes. Jinja's sandbox only stops templates from reaching
Python internals; nested loops, recursive macros or string doubling would otherwise run for hours
or fill the memory. The principle: every value a template builds stays within `max_chars`, and an
operation whose result could exceed it is refused before it runs; every operation (loop
iteration, call, filter) costs a step. So `+`, `*`, `%` and `~`, each filter and each call are
checked: their numeric arguments may not pass `max_chars` (`'x'.ljust(n)` allocates n characters
first); the ones that can grow faster than their input (`replace`, `indent`, `join`, `sum`,
`format`, `tojson` with an indent, and str's `replace`, `expandtabs`, `join`, `translate`, `format`)
have their result's size computed from their arguments first; a value turned into text (output,
`~`, `string`, ...) is measured as text first, since a list that holds one long string a thousand
times is short as a list; and every result, and every text a block or macro collects, is measured.
Filters whose cost has no cheap bound and that no chat template uses are left out: `wordwrap`
(quadratic on long words), `urlize`, `pprint`, and the `lipsum` function.
"""

import json
import re
import string
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
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.visitor import NodeTransformer

from scratchlm.errors import ConfigError
from scratchlm.tokenizer.tokenizer import Tokenizer

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


def _template_or_none(tokenizer: Tokenizer) -> str | None:
    own = tokenizer.metadata.get("chat_template")
    if own:
        return own
    if {"<|im_start|>", "<|im_end|>"} <= tokenizer.special_tokens.keys():
        return CHATML_TEMPLATE
    return None


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether conversations are rendered with a template (the model's own, or ChatML); a
    model without one completes plain text."""
    return _template_or_none(tokenizer) is not None


def chat_template(tokenizer: Tokenizer) -> str:
    """The model's own template, else ChatML when the tokenizer has its two tokens."""
    template = _template_or_none(tokenizer)
    if template is not None:
        return template
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
_COUNTED, _CONCAT = "_render_counted", "_render_concat"  # filters put in place of loops and `~`
MAX_INT_BITS = 4096  # integers a template computes: enough for any real template, no 9 ** 9999999
_FLOAT_DIGITS = 330  # '%f' % 1e308 writes 309 digits before the point
_UNBOUNDED = ("wordwrap", "urlize", "pprint")  # filters left out: see the module's docstring
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?([a-zA-Z%])")


def _text_size(value: Any, cap: int) -> int:
    """An upper bound on len(str(value)) and on its JSON (within a constant factor), counted only
    until it passes `cap`: the walk stops there, so it costs at most about `cap` steps."""
    if isinstance(value, str | bytes):
        return len(value)
    size, stack = 0, [value]
    while stack and size <= cap:
        item = stack.pop()
        if isinstance(item, str | bytes):
            size += len(item) + 4  # quotes and a separator
        elif isinstance(item, bool | float | None):
            size += 26
        elif isinstance(item, int):
            size += item.bit_length() // 3 + 4
        elif isinstance(item, Mapping):
            size += 2 + 2 * len(item)
            stack.extend(x for pair in item.items() for x in pair)
        elif isinstance(item, list | tuple | set | frozenset):
            size += 2 + len(item)
            stack.extend(item)
        elif hasattr(item, "__dict__"):  # a namespace() prints what it holds
            size += 100
            stack.append(vars(item))
        else:
            size += 100  # `<function ...>`, `<generator ...>`
    return size


def _depth(value: Any, cap: int) -> int:
    """How deeply lists and dicts nest in `value` (walks at most `cap` items)."""
    depth, stack, seen = 0, [(value, 0)], 0
    while stack and seen <= cap:
        item, level = stack.pop()
        seen += 1
        if isinstance(item, Mapping | list | tuple):
            depth = max(depth, level + 1)
            stack.extend((x, level + 1) for x in (item.values() if isinstance(item, Mapping) else item))
    return depth


def _replace_size(s: str | bytes, old: str | bytes, new: str | bytes, count: int | None = -1) -> int:
    hits = len(s) + 1 if not old else s.count(old)  # '' matches before every character and at the end
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _widest(values: Sequence, cap: int) -> tuple[int, int]:
    """The longest text of `values` (a float's digits included) and their largest integer: what
    one formatted field, and one `*` or nested width, can take at most."""
    longest = max((_text_size(v, cap) + (_FLOAT_DIGITS if isinstance(v, float) else 0) for v in values), default=0)
    largest = max((v for v in values if isinstance(v, int)), default=0)
    return longest, largest


def _percent_size(cap: int, fmt: str | bytes, values: Any) -> int:
    """`fmt % values`: its literal text plus, per field, its width and precision (`*` takes the
    largest number given) and the longest value's text."""
    values = values if isinstance(values, tuple) else (values,)
    if len(values) == 1 and isinstance(values[0], Mapping):
        values = tuple(values[0].values())
    longest, star = _widest(values, cap)
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    size = len(text)
    for width, precision, _ in _PERCENT_FIELD.findall(text):
        size += longest + sum(star if n == "*" else int(n or 0) for n in (width, precision))
    return size


def _str_format_size(cap: int, fmt: str, args: tuple, kwargs: Mapping) -> int:
    """`fmt.format(*args, **kwargs)`: literal text plus, per field, the longest value's text and
    the numbers of its format spec (a nested `{}` in the spec takes the largest number given)."""
    longest, largest = _widest((*args, *kwargs.values()), cap)
    size = 0
    for literal, field, spec, _ in string.Formatter().parse(fmt):
        size += len(literal)
        if field is not None:
            spec = spec or ""
            size += longest + sum(int(n) for n in re.findall(r"\d+", spec)) + (largest if "{" in spec else 0)
    return size


def _join_size(cap: int, separator: str | bytes, items: Sequence) -> int:
    size = max(0, len(items) - 1) * len(separator)
    for item in items:
        size += _text_size(item, cap)
        if size > cap:
            break
    return size


def _translate_size(s: str | bytes, table: Any) -> int:
    # str.translate maps a character to a string of any length, through a dict or a list
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, list | tuple) else ()
    return len(s) * max([1, *(len(v) for v in values if isinstance(v, str))])


def _method_size(cap: int, method: Any, args: tuple, kwargs: Mapping) -> int | None:
    """The size of what a str or bytes method called from a template returns, when it can grow
    faster than its input; None for the others (their result is measured after)."""
    method = getattr(method, "__wrapped__", method)  # the sandbox's wrapper of str.format
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str | bytes):
        return None
    if name == "replace":
        return _replace_size(owner, *args, **kwargs)
    if name == "expandtabs":
        tabsize = (args or (kwargs.get("tabsize", 8),))[0]
        return len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * max(0, tabsize)
    if name == "join" and args:
        return _join_size(cap, owner, args[0])
    if name == "translate" and args:
        return _translate_size(owner, args[0])
    if name == "format":
        return _str_format_size(cap, owner, args, kwargs)
    if name == "format_map" and args and isinstance(args[0], Mapping):
        return _str_format_size(cap, owner, (), args[0])
    return None


def _indent_size(cap: int, env: jinja2.Environment, s: Any, width: int | str = 4, *_: Any, **__: Any) -> int:
    text = str(s)
    return len(text) + 1 + (len(text.splitlines()) + 1) * (len(width) if isinstance(width, str) else max(0, width))


def _attributes(env: jinja2.Environment, items: Sequence, attribute: Any) -> Sequence:
    """`items`, or the `attribute` of each, as the filters given `attribute=` see them."""
    if attribute is None:
        return items
    getter = jinja2.filters.make_attrgetter(env, attribute)
    return [getter(item) for item in items]


def _filter_join_size(cap: int, env: jinja2.Environment, items: Sequence, d: str = "", attribute: Any = None) -> int:
    return _join_size(cap, str(d), _attributes(env, items, attribute))


def _sum_size(cap: int, env: jinja2.Environment, items: Sequence, attribute: Any = None, start: Any = 0) -> int:
    # only lists and tuples concatenate: `[a] * 1000 | sum(start=[])` repeats what `a` holds
    sequences = [x for x in (start, *_attributes(env, items, attribute)) if isinstance(x, list | tuple)]
    return sum(len(x) for x in sequences)


def _tojson_size(cap: int, env: jinja2.Environment, value: Any, ensure_ascii: bool = False, indent: Any = None,
                 separators: Any = None, sort_keys: bool = False) -> int:
    # every item can start a line indented once per level, and carries both separators
    text = _text_size(value, cap)
    per_level = len(indent) if isinstance(indent, str) else (indent or 0) if isinstance(indent, int) else 0
    spacing = sum(len(str(s)) for s in separators) if isinstance(separators, list | tuple) else 0
    return text * (1 + spacing + (indent is not None) + per_level * _depth(value, cap))


def _round_size(cap: int, env: jinja2.Environment, value: Any, precision: int = 0, method: str = "common") -> int:
    if isinstance(precision, int) and precision * 10 // 3 > MAX_INT_BITS:  # round computes 10 ** precision
        raise ChatTemplateError(f"chat: the model's chat template computes a number of more than {MAX_INT_BITS} bits")
    return 0


# The filters that can return more than a constant times their input, with the size of what they
# return computed from their arguments. `center`, `batch`, `slice` and `truncate` grow at most by
# a numeric argument (itself capped), the rest of Jinja's filters keep or shrink their input.
_FILTER_SIZES = {
    "replace": lambda cap, env, s, old, new, count=None: _replace_size(str(s), str(old), str(new), count),
    "indent": _indent_size,
    "join": _filter_join_size,
    "sum": _sum_size,
    "format": lambda cap, env, fmt, *args, **kwargs: _percent_size(cap, str(fmt), kwargs or args),
    "tojson": _tojson_size,
    "round": _round_size,
}
# Filters that turn their input into text: it is measured as text before they run.
_TEXT_FILTERS = frozenset({"capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower", "replace",
                           "safe", "string", "striptags", "title", "tojson", "trim", "truncate", "upper", "urlencode",
                           "wordcount", "xmlattr"})


def _check_rendered_size(size: int, max_chars: int) -> None:
    if size > max_chars:
        raise ChatTooLongError(f"chat: the conversation renders to more than {max_chars:,} characters "
                               "with the model's chat template; shorten it")


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
        _check_rendered_size(size, self.limits.max_chars)

    def check_numbers(self, values: Iterable) -> None:
        # `'x'.ljust(n)`, `center(n)`, `batch(n, fill)` allocate n items first: refused before they run
        if any(isinstance(v, int) and v > self.limits.max_chars for v in values):
            raise ChatTemplateError(f"chat: the model's chat template passes a number over "
                                    f"{self.limits.max_chars:,} to a call")

    def sized(self, value: Any) -> Any:
        if isinstance(value, str | bytes | list | tuple):
            self.check_size(len(value))
        return value

    def text(self, value: Any) -> Any:
        self.check_size(_text_size(value, self.limits.max_chars))
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
def _concat(context: Context, operands: list) -> str:
    # `a ~ b ~ c` as Jinja computes it without autoescape, measured as text before it is joined
    budget = _budget(context)
    budget.check_size(_join_size(budget.limits.max_chars, "", operands))
    return "".join(map(str, operands))


@jinja2.pass_context
def _checked_output(context: Context, value: Any) -> Any:
    return _budget(context).text(value)  # `{{ value }}`: measured before Jinja calls str() on it


_PASSES = jinja2.utils._PassArg  # what Jinja hands a filter before its input: nothing, the context, ...


def _bounded_filter(name: str, function: Any) -> Any:
    """`function` (a filter) counted as a step, its numbers and input checked and its result's
    size computed first where `_FILTER_SIZES` knows it, and its result measured."""
    passes = _PASSES.from_obj(function)

    @jinja2.pass_context
    def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget(context)
        budget.step()
        budget.check_numbers((*args, *kwargs.values()))
        if name in _TEXT_FILTERS:
            for item in (value, *args, *kwargs.values()):
                budget.text(item)
        if name in ("join", "sum") and isinstance(value, Iterator):  # measured and then used: a list
            value = list(value)
        if name in _FILTER_SIZES:
            budget.check_size(_FILTER_SIZES[name](budget.limits.max_chars, context.environment, value, *args, **kwargs))
        first = {None: (), _PASSES.context: (context,), _PASSES.eval_context: (context.eval_ctx,),
                 _PASSES.environment: (context.environment,)}[passes]
        return budget.sized(function(*first, value, *args, **kwargs))

    return bounded


def _check_operands(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse `left operator right` before Python computes it when the result would be over the
    size cap (a sequence or a text) or MAX_INT_BITS (an integer)."""
    sequences = str | bytes | list | tuple
    cap = budget.limits.max_chars
    if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
        budget.check_size(len(left) + len(right))
    elif operator == "*" and isinstance(left, sequences) and isinstance(right, int):
        budget.check_size(len(left) * right)
    elif operator == "*" and isinstance(right, sequences) and isinstance(left, int):
        budget.check_size(len(right) * left)
    elif operator == "%" and isinstance(left, str | bytes):  # '%*d' % (10 ** 7, 1)
        budget.check_size(_percent_size(cap, left, right))
    elif isinstance(left, int) and isinstance(right, int) and operator in ("*", "**"):
        bits = left.bit_length() + right.bit_length() if operator == "*" else left.bit_length() * max(right, 0)
        if bits > MAX_INT_BITS:
            raise ChatTemplateError(f"chat: the model's chat template computes a number of more than "
                                    f"{MAX_INT_BITS} bits")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox with every call counted and checked, `+`, `*`, `%` and `**` checked before
    they run, and every text a block or macro collects measured before it is joined."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self, max_chars: int, **options: Any) -> None:
        super().__init__(finalize=_checked_output, **options)
        self.max_chars = max_chars

    def concat(self, pieces: Iterable[str]) -> str:  # noqa: D102 - Jinja's join of a block's output
        pieces = list(pieces)
        _check_rendered_size(sum(map(len, pieces)), self.max_chars)
        return "".join(pieces)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's names
        budget = _budget(__context)
        budget.step()
        if __obj is not safe_range:  # a range is lazy, capped by the sandbox, and counted as it is looped over
            budget.check_numbers((*args, *kwargs.values()))
        if isinstance(__obj, LoopContext) and args:  # `loop(children)` of a recursive loop
            args = (_counted_items(budget, args[0]), *args[1:])
        method = getattr(getattr(__obj, "__wrapped__", __obj), "__name__", "")
        if method == "join" and args and isinstance(args[0], Iterator):  # measured and then used: a list
            args = (list(args[0]), *args[1:])
        size = _method_size(budget.limits.max_chars, __obj, args, kwargs)
        if size is not None:
            budget.check_size(size)
        return budget.sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget(context)
        _check_operands(budget, operator, left, right)
        return budget.sized(super().call_binop(context, operator, left, right))


class _CountLoops(NodeTransformer):
    """Every `{% for %}` iterates through `_counted` and every `~` is computed by `_concat`: the
    two things the sandbox's hooks never see."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _COUNTED, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT, [], [], None, None, lineno=node.lineno)


@lru_cache(maxsize=16)
def _compile(template: str, max_chars: int) -> jinja2.Template:
    # The environment transformers renders templates in, so prompts match it byte for byte.
    env = _BoundedSandbox(max_chars, trim_blocks=True, lstrip_blocks=True,
                          extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    for name in _UNBOUNDED:
        del env.filters[name]
    env.filters.update({name: _bounded_filter(name, function) for name, function in env.filters.items()})
    env.filters.update({_COUNTED: _counted, _CONCAT: _concat})
    del env.globals["lipsum"]
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
    template = _compile(chat_template(tokenizer), limits.max_chars)
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
