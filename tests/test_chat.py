"""Chat: `ChatSession` (history, system prompt, context), the `run_chat` loop and its commands,
`scratchlm chat` with standard input from a pipe, and the chat templates it renders with."""

import copy
import io
import subprocess
import sys

import pytest

from scratchlm.cli import main
from scratchlm.errors import ConfigError, ContextTooLongError
from scratchlm.interop import open_model
from scratchlm.model import GPT, get_preset
from scratchlm.model.folder import save_model_folder
from scratchlm.serve.chat import ChatSession, default_max_new_tokens, run_chat
from scratchlm.tokenizer.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    ChatTemplateRefusal,
    ChatTooLongError,
    RenderLimits,
    chat_stop_ids,
    check_messages,
    render_chat,
)
from scratchlm.model.sampling import SamplingConfig
from scratchlm.tokenizer import train_bpe
from conftest import finishes_within, tiny_tokenizer

TRAIN_TEXT = (
    "The interpreter reads a line, evaluates it and prints the result. Hi there, how can I help? "
    "A loop repeats a block of statements while a condition holds.\n"
) * 20
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
USER = {"role": "user", "content": "hello"}


@pytest.fixture(scope="module")
def tokenizer():
    """Overrides conftest's: conftest's `model` and `model_folder` then use this one."""
    return tiny_tokenizer(TRAIN_TEXT)


class ScriptedReplies(GPT):
    """A tiny GPT that says what it is told: after each prompt (the prefill) the next script
    starts, and the n-th new token is the script's n-th (the last repeats). The real forward
    pass still runs, so the KV cache is used as in any model."""

    def __init__(self, vocab_size: int, scripts: list[list[int]]) -> None:
        super().__init__(get_preset("cpu-tiny").replace(vocab_size=vocab_size))
        self.scripts, self.turn, self.n = scripts, -1, 0
        self.eval()

    def forward(self, idx, targets=None, cache=None, last_only=False):
        logits, loss = super().forward(idx, targets, cache, last_only)
        if last_only or idx.size(1) > 1:  # a prompt: the next reply begins
            self.turn, self.n = self.turn + 1, 0
        script = self.scripts[self.turn % len(self.scripts)]
        logits[:, -1] = -100.0
        logits[:, -1, script[min(self.n, len(script) - 1)]] = 100.0
        self.n += 1
        return logits, loss


def scripted(tokenizer, *replies: str) -> ScriptedReplies:
    """Replies that each end with <|im_end|>, followed by text that must never show."""
    end = tokenizer.special_tokens["<|im_end|>"]
    return ScriptedReplies(tokenizer.vocab_size, [tokenizer.encode(r) + [end] + tokenizer.encode(" leaked") for r in replies])


def prompt_tokens(session: ChatSession, user_text: str) -> int:
    return len(session.tokenizer.encode(render_chat(session.tokenizer, session.conversation(user_text)), allowed_special="all"))


# ---- ChatSession -------------------------------------------------------------------------------
def test_streamed_pieces_concatenate_to_the_reply_and_both_turns_join_the_history(model, tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    pieces: list[str] = []
    first = session.reply(model, "The interpreter", on_text=pieces.append)
    assert first and "".join(pieces) == first
    assert session.messages == [{"role": "user", "content": "The interpreter"}, {"role": "assistant", "content": first}]
    second = session.reply(model, "A loop")
    assert [m["content"] for m in session.messages] == ["The interpreter", first, "A loop", second]


def test_the_next_prompt_renders_the_whole_conversation(model, tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    first = session.reply(model, "The interpreter")
    assert session.fit_prompt("A loop", model.config.block_size) == (
        f"<|im_start|>user\nThe interpreter<|im_end|>\n<|im_start|>assistant\n{first}<|im_end|>\n"
        "<|im_start|>user\nA loop<|im_end|>\n<|im_start|>assistant\n"
    )


def test_reply_ends_at_the_end_of_turn_token_which_is_not_part_of_it(tokenizer):
    # The trained tokenizer's end of sequence is <|endoftext|>: only chat_stop_ids makes <|im_end|> stop.
    assert tokenizer.eos_id != tokenizer.special_tokens["<|im_end|>"]
    session = ChatSession(tokenizer, config=SamplingConfig(temperature=0.7, max_new_tokens=30, seed=1))
    assert session.reply(scripted(tokenizer, "Hi there"), "hello") == "Hi there"


def test_session_keeps_stop_token_ids_of_its_config(tokenizer):
    session = ChatSession(tokenizer, config=SamplingConfig(stop_token_ids=(7,)))
    assert session.config.stop_token_ids == (7, *chat_stop_ids(tokenizer))


def test_reset_forgets_the_conversation_but_keeps_the_system_prompt(tokenizer):
    session = ChatSession(tokenizer, system="Be brief.", config=GREEDY)
    session.reply(scripted(tokenizer, "Hi there"), "hello")
    session.reset()
    assert session.messages == []
    assert session.conversation("again") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "again"}]


def test_system_prompt_is_rendered_first_and_replacing_it_keeps_the_turns(tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    model = scripted(tokenizer, "Hi there")
    session.reply(model, "hello")
    assert session.fit_prompt("next", 128).startswith("<|im_start|>user\nhello<|im_end|>")
    session.set_system("Be brief.")
    prompt = session.fit_prompt("next", 128)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n")
    assert "Hi there" in prompt
    session.set_system("")
    assert session.system is None and session.fit_prompt("next", 128).startswith("<|im_start|>user\n")


def test_oldest_exchanges_are_forgotten_when_the_conversation_outgrows_the_context(tokenizer):
    model = scripted(tokenizer, "Hi there")
    block = model.config.block_size
    session = ChatSession(tokenizer, system="Be brief.", config=SamplingConfig(temperature=0, max_new_tokens=16))
    for n in range(8):
        session.messages += [{"role": "user", "content": f"question {n} " + "loop " * 6},
                             {"role": "assistant", "content": f"answer {n}"}]
    assert prompt_tokens(session, "hello") > block - 16
    before = list(session.messages)
    notices: list[str] = []
    assert session.reply(model, "hello", on_notice=notices.append) == "Hi there"
    kept = session.messages[:-2]
    assert session.messages[-2:] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there"}]
    assert kept == before[len(before) - len(kept) :] and len(kept) % 2 == 0  # the newest whole exchanges
    dropped = (len(before) - len(kept)) // 2
    assert notices == [f"(the conversation outgrew the context of {block} tokens: forgot the oldest {dropped} exchanges)"]
    # as few as needed: the prompt fitted, and with one more exchange it would not have
    assert prompt_tokens(ChatSession(tokenizer, "Be brief.", messages=kept), "hello") <= block - 16
    assert prompt_tokens(ChatSession(tokenizer, "Be brief.", messages=before[-len(kept) - 2 :]), "hello") > block - 16
    assert session.system == "Be brief."


def test_a_message_that_does_not_fit_alone_raises_context_too_long_and_changes_nothing(tokenizer):
    session = ChatSession(tokenizer, system="Be brief.", config=SamplingConfig(temperature=0, max_new_tokens=16))
    model = scripted(tokenizer, "Hi there")
    session.reply(model, "hello")
    before = list(session.messages)
    with pytest.raises(ContextTooLongError, match=r"with the system prompt takes \d+ tokens.*context of 128 tokens keeps 16"):
        session.reply(model, "loop " * 200)
    assert session.messages == before


def test_a_reply_budget_as_large_as_the_context_is_refused_with_a_hint(tokenizer, model):
    session = ChatSession(tokenizer, config=SamplingConfig(max_new_tokens=128))
    with pytest.raises(ContextTooLongError, match="leaves 0; shorten it or lower max_new_tokens$"):
        session.reply(model, "hi")
    named = ChatSession(tokenizer, config=SamplingConfig(max_new_tokens=128), limit_name="--max-new-tokens")
    with pytest.raises(ContextTooLongError, match="leaves 0; shorten it or lower --max-new-tokens$"):
        named.reply(model, "hi")
    assert default_max_new_tokens(128) == 64 and default_max_new_tokens(8192) == 512


def test_an_interrupted_reply_keeps_what_was_shown(tokenizer):
    session = ChatSession(tokenizer, config=SamplingConfig(temperature=0, max_new_tokens=30))
    model = scripted(tokenizer, "Hi there, how can I help?")
    shown: list[str] = []

    def show_then_interrupt(piece: str) -> None:
        if len(shown) == 2:
            raise KeyboardInterrupt
        shown.append(piece)

    with pytest.raises(KeyboardInterrupt):
        session.reply(model, "hello", on_text=show_then_interrupt)
    assert session.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "".join(shown)}]
    assert 0 < len("".join(shown)) < len("Hi there, how can I help?")
    assert not model.training


def test_a_model_without_a_chat_template_is_refused_at_once():
    plain = train_bpe([TRAIN_TEXT], vocab_size=270, workers=1, min_frequency=1, special_tokens=("<|endoftext|>",))
    with pytest.raises(ConfigError, match="no chat template.*scratchlm generate"):
        ChatSession(plain)


def test_more_than_one_sample_per_reply_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="num_samples must be 1"):
        ChatSession(tokenizer, config=SamplingConfig(num_samples=2))


# ---- run_chat: the loop and its commands ---------------------------------------------------------
class Terminal:
    """Lines to type, and what the loop wrote and noticed."""

    def __init__(self, *lines: str) -> None:
        self.lines, self.prompts, self.out, self.notices = list(lines), [], [], []

    def read_line(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def run(self, session: ChatSession, model) -> None:
        run_chat(session, model, self.read_line, self.out.append, self.notices.append)


def test_run_chat_commands(tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    term = Terminal("hello", "/system Be brief.", "/system", "/reset", "/nope", "   ", "//slash", "/help", "/exit", "unread")
    term.run(session, scripted(tokenizer, "Hi there", "Sure"))
    assert term.prompts == ["you> "] * 9 and term.lines == ["unread"]
    assert "".join(term.out) == "Hi there\nSure\n"  # only the replies: what commands show is a notice
    assert term.notices[:4] == ["(system prompt set)", "Be brief.", "(conversation forgotten)",
                                "unknown command /nope; /help lists the commands"]
    assert len(term.notices) == 5 and term.notices[4].startswith("/reset")  # /help's list
    assert session.system == "Be brief."
    assert session.messages == [{"role": "user", "content": "/slash"}, {"role": "assistant", "content": "Sure"}]


def test_run_chat_without_a_notice_callback_writes_notices_as_lines(tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    out: list[str] = []
    run_chat(session, scripted(tokenizer, "Hi there"), Terminal("/system", "/reset").read_line, out.append)
    assert "".join(out) == ("(no system prompt: the chat template's default applies, if it has one)\n"
                            "(conversation forgotten)\n")


def test_a_reply_cut_at_the_token_limit_gets_a_notice_and_one_that_ended_does_not(tokenizer):
    session = ChatSession(tokenizer, config=SamplingConfig(temperature=0, max_new_tokens=3), limit_name="--max-new-tokens")
    term = Terminal("hello", "again")
    term.run(session, scripted(tokenizer, "Hi there, how can I help?", "Hi"))
    cut = session.messages[1]["content"]
    assert len(tokenizer.encode(cut)) == 3 and "Hi there, how can I help?".startswith(cut)
    assert "".join(term.out) == f"{cut}\nHi\n"
    assert term.notices == ["(reply cut at --max-new-tokens)"]  # the first reply only
    assert session.finish_reason == "stop"


def test_finish_reason_says_why_the_last_reply_ended(tokenizer):
    session = ChatSession(tokenizer, config=SamplingConfig(temperature=0, max_new_tokens=3))
    assert session.finish_reason is None
    session.reply(scripted(tokenizer, "Hi there, how can I help?"), "hello")
    assert session.finish_reason == "length"
    session.reply(scripted(tokenizer, "Hi"), "hello")
    assert session.finish_reason == "stop"


def test_run_chat_ends_at_end_of_input(tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    term = Terminal("hello")
    term.run(session, scripted(tokenizer, "Hi there"))
    assert "".join(term.out) == "Hi there\n" and len(term.prompts) == 2


def test_ctrl_c_stops_a_reply_but_not_the_chat(tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    term = Terminal("hello", "again")
    interrupted = []

    def write(text: str) -> None:
        if not interrupted:
            interrupted.append(text)
            raise KeyboardInterrupt
        term.out.append(text)

    run_chat(session, scripted(tokenizer, "Hi there", "Sure"), term.read_line, write, term.notices.append)
    assert term.notices == ["(reply stopped)"]
    assert "".join(term.out) == "\nSure\n"
    assert [m["content"] for m in session.messages] == ["hello", "", "again", "Sure"]


def test_ctrl_c_at_the_prompt_does_not_quit(tokenizer):
    session = ChatSession(tokenizer, config=GREEDY)
    lines = iter([KeyboardInterrupt, "hello"])

    def read_line(prompt: str) -> str:
        line = next(lines, EOFError)
        if isinstance(line, type):
            raise line
        return line

    out: list[str] = []
    run_chat(session, scripted(tokenizer, "Hi there"), read_line, out.append, lambda _: None)
    assert "".join(out) == "Hi there\n"


def test_a_message_too_long_for_the_context_is_reported_and_the_chat_goes_on(tokenizer):
    session = ChatSession(tokenizer, config=SamplingConfig(temperature=0, max_new_tokens=16))
    term = Terminal("loop " * 200, "hello")
    term.run(session, scripted(tokenizer, "Hi there"))
    assert len(term.notices) == 1 and term.notices[0].startswith("error: chat: the message takes")
    assert "".join(term.out) == "Hi there\n"


# ---- chat templates ------------------------------------------------------------------------------
def test_chatml_renders_each_message_and_opens_the_reply(tokenizer):
    messages = [{"role": "system", "content": "S"}, USER, {"role": "assistant", "content": "A"}]
    chatml = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert render_chat(tokenizer, messages) == chatml + "<|im_start|>assistant\n"
    assert render_chat(tokenizer, messages, add_generation_prompt=False) == chatml
    ids = tokenizer.encode(render_chat(tokenizer, [USER]), allowed_special="all")
    assert ids[0] == tokenizer.special_tokens["<|im_start|>"] and tokenizer.special_tokens["<|im_end|>"] in ids


def test_the_models_own_template_wins_over_chatml(tokenizer):
    own = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)
    own.metadata["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ bos_token }}"
    own.metadata["bos_token_id"] = own.special_tokens["<|im_start|>"]
    assert render_chat(own, [USER]) == "[user] hello\n<|im_start|>"
    assert render_chat(tokenizer, [USER]) != render_chat(own, [USER])
    assert CHATML_TEMPLATE not in own.metadata.values()


@pytest.mark.parametrize(("messages", "error"), [
    ([], "messages is empty"),
    ([USER, {"role": "robot", "content": "x"}], "message 1 has role 'robot'"),
    ([{"role": "user", "content": None}], "message 0 has no text content"),
    (["hello"], "message 0 is not an object"),
])
def test_bad_messages_are_config_errors_naming_the_message(tokenizer, messages, error):
    with pytest.raises(ConfigError, match=error):
        render_chat(tokenizer, messages)
    with pytest.raises(ConfigError, match=error):
        check_messages(messages)


@pytest.mark.parametrize(("template", "error"), [
    ("{{ raise_exception('system messages are not supported') }}", "refused the conversation: system messages"),
    ("{% for m in messages %}", "not valid Jinja"),
    ("{{ messages[0].content.nope() }}", "template failed"),
])
def test_a_template_that_fails_is_a_config_error(template, error):
    tok = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)
    tok.metadata["chat_template"] = template
    with pytest.raises(ConfigError, match=error):
        render_chat(tok, [USER])


def with_template(tokenizer, template: str):
    own = copy.deepcopy(tokenizer)
    own.metadata["chat_template"] = template
    return own


def test_a_python_error_inside_a_template_is_a_template_error_not_a_crash(tokenizer):
    with pytest.raises(ChatTemplateError, match="template failed: TypeError"):
        render_chat(with_template(tokenizer, "{% for c in 5 %}{% endfor %}"), [USER])


def test_raise_exception_is_a_refusal_of_the_conversation(tokenizer):
    with pytest.raises(ChatTemplateRefusal, match="refused the conversation: no"):
        render_chat(with_template(tokenizer, "{{ raise_exception('no') }}"), [USER])


# Templates come from model files. Each of these would run for hours or fill the memory; the
# renderer's step budget (loop iterations and calls) and size cap stop them at once.
RUNAWAY_TEMPLATES = {
    "range_over_the_sandbox_cap": "{% for i in range(10**9) %}x{% endfor %}",
    "nested_silent_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "one_range_iterated_in_nested_loops": "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "exponential_macro_recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "recursive_loop": "{% for i in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}",
    "huge_power": "{{ 9 ** 9999999 }}",
    "padding_by_a_method": "{{ 'x'.ljust(10**12) }}",
}
HUGE_TEMPLATES = {
    "huge_output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "string_repetition": "{{ 'x' * 10**12 }}",
    "list_repetition": "{{ ([1] * 10**12) | length }}",
    "doubling_by_tilde": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling_by_plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
}


@pytest.mark.parametrize("template", RUNAWAY_TEMPLATES.values(), ids=RUNAWAY_TEMPLATES.keys())
def test_a_runaway_template_stops_with_a_template_error(tokenizer, template):
    with pytest.raises(ChatTemplateError, match="chat template") as error:
        render_chat(with_template(tokenizer, template), [USER])
    assert not isinstance(error.value, ChatTooLongError | ChatTemplateRefusal)


@pytest.mark.parametrize("template", HUGE_TEMPLATES.values(), ids=HUGE_TEMPLATES.keys())
def test_a_template_building_a_text_over_the_cap_is_too_long(tokenizer, template):
    with pytest.raises(ChatTooLongError, match="more than 1,000,000 characters"):
        render_chat(with_template(tokenizer, template), [USER], limits=RenderLimits(max_chars=1_000_000))


# Operations whose result can be far longer than their input: each is refused before it runs,
# from its arguments' sizes, with a cap of 2,560 characters. A = 'x' * 2000 is under the cap.
A = "{% set a = 'x' * 2000 %}"
EXPANDING_TEMPLATES = {
    "replace_filter": "{% set a = 'x'|center(2000) %}{% set b = a|replace(' ', a) %}{{ b|length }}",
    "replace_filter_of_the_empty_string": A + "{{ a|replace('', a)|length }}",
    "replace_method": A + "{{ a.replace('x', a)|length }}",
    "expandtabs_method": "{{ ('\\t' * 2000).expandtabs(2000)|length }}",
    "join_method": A + "{{ a.join(['b'] * 2000)|length }}",
    "join_filter": A + "{{ range(2000)|join(a)|length }}",
    "join_filter_of_an_attribute": A + "{{ [{'t': a}, {'t': a}]|join(attribute='t')|length }}",
    "translate_method": A + "{{ 'abc'.translate({97: a})|length }}",
    "format_method_repeating_a_value": A + "{{ '{0}{0}'.format(a)|length }}",
    "format_method_width": "{{ '{:>2000}{:>2000}'.format(1, 2)|length }}",
    "format_method_nested_width": "{{ '{:{}}{:{}}'.format(1, 2000, 2, 2000)|length }}",
    "percent_operator_star_width": "{{ ('%*d' % (10 ** 7, 1))|length }}",
    "percent_operator_literal_width": "{{ ('%9999999d' % 1)|length }}",
    "percent_operator_precision": "{{ ('%.9999999f' % 1.0)|length }}",
    "format_filter": A + "{{ '%s%s'|format(a, a)|length }}",
    "indent_filter": A + "{{ ('\\n' * 2000)|indent(a, true, true)|length }}",
    "sum_filter_of_lists": "{{ ([['x'] * 2000] * 10)|sum(start=[])|length }}",
    "tojson_filter_indent": A + "{{ [[[[1, 2]]]]|tojson(indent=a)|length }}",
    "a_list_output_as_text": A + "{% set b = [a] * 2000 %}{% set c = [b] * 2000 %}{{ c }}",
    "a_list_joined_by_tilde": A + "{% set b = [a] * 2000 %}{% set c = [b] * 2000 %}{{ (c ~ '')|length }}",
    "a_list_as_json": A + "{% set b = [a] * 2000 %}{% set c = [b] * 2000 %}{{ (c|tojson)|length }}",
    "a_block_collecting_output": A + "{% set s %}{% for i in range(2000) %}{{ a }}{% endfor %}{% endset %}{{ s|length }}",
    "a_macro_collecting_output": A + "{% macro m() %}{% for i in range(2000) %}{{ a }}{% endfor %}{% endmacro %}"
                                     "{{ m()|length }}",
}
# Refused as the template's fault: a number over the cap, or a name the renderer does not provide.
REFUSED_TEMPLATES = {
    "lipsum": ("{{ lipsum(2000)|length }}", "'lipsum' is undefined"),
    "replace_of_a_wide_center": ("{% set a='x'|center(3000) %}{% set b=a|replace(' ',a) %}{{ b|length }}",
                                 "passes a number over 2,560 to a call"),
    "wordwrap": ("{{ ('ab'|center(5000000))|wordwrap(3)|length }}", "No filter named 'wordwrap'"),
    "batch_padding": ("{{ [1]|batch(10 ** 6, 'x')|list|length }}", "passes a number over 2,560"),
}


@pytest.mark.parametrize("template", EXPANDING_TEMPLATES.values(), ids=EXPANDING_TEMPLATES.keys())
def test_an_operation_whose_result_would_pass_the_cap_is_refused_before_it_runs(tokenizer, template):
    with finishes_within(30), pytest.raises(ChatTooLongError, match="more than 2,560 characters"):
        render_chat(with_template(tokenizer, template), [USER], limits=RenderLimits(max_chars=2560))


@pytest.mark.parametrize(("template", "error"), REFUSED_TEMPLATES.values(), ids=REFUSED_TEMPLATES.keys())
def test_a_template_using_what_the_renderer_cannot_bound_is_refused(tokenizer, template, error):
    with finishes_within(30), pytest.raises(ChatTemplateError, match=error) as raised:
        render_chat(with_template(tokenizer, template), [USER], limits=RenderLimits(max_chars=2560))
    assert not isinstance(raised.value, ChatTooLongError)


def test_rounding_to_a_huge_precision_is_refused_before_it_computes_the_power(tokenizer):
    with finishes_within(30), pytest.raises(ChatTemplateError, match="more than 4096 bits"):
        render_chat(with_template(tokenizer, "{{ 1.5|round(10 ** 7) }}"), [USER])


def test_every_filter_call_costs_a_step(tokenizer):
    filters = with_template(tokenizer, "{{ 'a'|upper|lower|trim }}")  # three filters, no loop or call
    assert render_chat(filters, [USER], limits=RenderLimits(max_steps=3)) == "a"
    with pytest.raises(ChatTemplateError, match="more than 2 steps"):
        render_chat(filters, [USER], limits=RenderLimits(max_steps=2))


def test_the_expanding_operations_render_as_jinja_does_under_the_cap(tokenizer):
    template = ("{{ 'a-b'|replace('-', '+') }} {{ 'x\\ny'|indent(2) }} {{ [1, 2]|join(',') }} {{ '%s=%d'|format('k', 3) }} "
                "{{ '%03d' % 7 }} {{ '{}:{:>3}'.format('a', 1) }} {{ ','.join(['p', 'q']) }} {{ 'a\\tb'.expandtabs(2) }} "
                "{{ [[1], [2]]|sum(start=[]) }} {{ {'k': [1]}|tojson(indent=1) }} {{ [1, 'a'] ~ '!' }}")
    expected = 'a+b x\n  y 1,2 k=3 007 a:  1 p,q a b [1, 2] {\n "k": [\n  1\n ]\n} [1, \'a\']!'
    assert render_chat(with_template(tokenizer, template), [USER]) == expected


def test_a_conversation_that_renders_over_the_cap_is_too_long_and_one_under_it_renders(tokenizer):
    text = render_chat(tokenizer, [USER])
    assert render_chat(tokenizer, [USER], limits=RenderLimits(max_chars=len(text))) == text
    with pytest.raises(ChatTooLongError, match=f"more than {len(text) - 1} characters"):
        render_chat(tokenizer, [USER], limits=RenderLimits(max_chars=len(text) - 1))


def test_the_step_budget_counts_loop_iterations(tokenizer):
    loop = with_template(tokenizer, "{% for c in 'abcdefghij' %}{% endfor %}")  # no calls: 10 steps
    assert render_chat(loop, [USER], limits=RenderLimits(max_steps=10)) == ""
    with pytest.raises(ChatTemplateError, match="more than 9 steps"):
        render_chat(loop, [USER], limits=RenderLimits(max_steps=9))


def test_a_render_over_its_time_limit_stops(tokenizer):
    with pytest.raises(ChatTemplateError, match="longer than 0 s"):
        render_chat(tokenizer, [USER], limits=RenderLimits(max_seconds=0))


def test_a_template_cannot_disarm_its_budget(tokenizer):
    # The budget travels as a render variable; replacing it must stop the render, not lift the limits.
    template = "{% set _render_budget = none %}{% for i in range(10) %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="chat template"):
        render_chat(with_template(tokenizer, template), [USER])


def test_a_long_real_conversation_renders_within_the_default_limits(tokenizer):
    # The server's cap on messages (1024), with a template that loops and calls per message.
    template = ("{% for m in messages %}{{ loop.index }} {{ m['role'] | upper }}: {{ m['content'].strip() }}"
                "{{ '\\n' if not loop.last }}{% endfor %}")
    conversation = [{"role": ("user", "assistant")[i % 2], "content": f" turn {i} "} for i in range(1024)]
    text = render_chat(with_template(tokenizer, template), conversation)
    assert text.startswith("1 USER: turn 0\n2 ASSISTANT: turn 1") and text.endswith("1024 ASSISTANT: turn 1023")


# transformers renders templates with jinja2.ext.loopcontrols, its own `generation` tag, a
# `tojson` that keeps non-ASCII and HTML characters, and `strftime_now` (Llama 3's templates).
TRANSFORMERS_FEATURES = [
    ("{% for m in messages %}{{ m.content }}{% break %}{% endfor %}", "hello"),
    ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}", "hello"),
    ("{{ {'a': 'é<b>'} | tojson }}", '{"a": "é<b>"}'),
    ("{{ strftime_now('%Y') | length }}", "4"),
]


@pytest.mark.parametrize(("template", "expected"), TRANSFORMERS_FEATURES)
def test_templates_render_with_what_transformers_provides(template, expected):
    tok = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)
    tok.metadata["chat_template"] = template
    assert render_chat(tok, [USER]) == expected


def test_chat_stop_ids_are_end_of_sequence_and_end_of_turn_once_each(tokenizer):
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert chat_stop_ids(tokenizer) == (tokenizer.eot_id, im_end)
    own_eos = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)
    own_eos.metadata["eos_token_id"] = im_end  # as SmolLM2: end of sequence is end of turn
    assert chat_stop_ids(own_eos) == (im_end,)


# ---- scratchlm chat ----------------------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter imports torch: several seconds
def test_chat_command_with_piped_input_prints_only_the_replies(model_folder):
    lines = "The interpreter\n/reset\nThe interpreter\n/exit\nnever sent\n"
    result = subprocess.run([sys.executable, "-m", "scratchlm.cli", "chat", str(model_folder), "--temperature", "0",
                             "--max-new-tokens", "8"], input=lines, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    opened = open_model(model_folder, kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    session = ChatSession(tokenizer, config=SamplingConfig(temperature=0, max_new_tokens=8))
    reply = session.reply(model, "The interpreter")
    assert result.stdout == f"{reply}\n{reply}\n"  # /reset: the same message gets the same greedy reply
    cut = "(reply cut at --max-new-tokens)\n" if session.finish_reason == "length" else ""
    assert result.stderr == f"{cut}(conversation forgotten)\n{cut}"


def test_chat_command_limits_the_reply_to_half_a_short_context(model_folder, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/system\n\nloop " + "loop " * 70 + "\n"))
    assert main(["chat", str(model_folder), "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == ""  # standard output holds only replies: /system's answer is a notice, the empty line is skipped
    assert err.startswith("(no system prompt: the chat template's default applies, if it has one)\n")
    assert "context of 128 tokens keeps 64 for the reply" in err  # default_max_new_tokens(128)
    assert err.rstrip().endswith("shorten it or lower --max-new-tokens")  # the flag, as the CLI user knows it


@pytest.mark.parametrize(("args", "error"), [
    (["--temperature", "-1"], "temperature must be"),
    (["--min-p", "2"], "min_p must be in [0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be"),
])
def test_chat_command_bad_settings_are_one_line_errors(model_folder, args, error, capsys):
    assert main(["chat", str(model_folder), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error: sampling: ") and error in err and err.count("\n") == 1


def test_chat_command_refuses_a_model_without_chat_template_in_one_line(tmp_path, monkeypatch, capsys):
    plain = train_bpe([TRAIN_TEXT], vocab_size=270, workers=1, min_frequency=1, special_tokens=("<|endoftext|>",))
    folder = save_model_folder(tmp_path / "plain", GPT(get_preset("cpu-tiny").replace(vocab_size=plain.vocab_size)), plain)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error: chat: the model has no chat template") and err.count("\n") == 1


# ---- a real chat model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_answers_with_paris_from_the_prompt_transformers_renders(smollm2, smollm2_gguf):
    from transformers import AutoTokenizer

    model, tokenizer = smollm2
    session = ChatSession(tokenizer, config=SamplingConfig(temperature=0, max_new_tokens=30))
    assert "Paris" in session.reply(model, "What is the capital of France?")

    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    session.set_system("Answer in one word.")
    for conversation in (session.conversation("And of Italy?"), session.conversation("And of Italy?")[1:]):
        expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert render_chat(tokenizer, conversation) == expected
        assert tokenizer.encode(expected, allowed_special="all") == list(
            hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
