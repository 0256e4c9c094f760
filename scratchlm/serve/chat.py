"""Chat: a conversation with a model, one reply at a time, and the terminal loop of `scratchlm chat`.

A `ChatSession` holds what the model sees each turn: the system prompt, the user and assistant
messages so far, and the sampling settings. Each reply renders the whole conversation with the
model's chat template (`render_chat`) and samples with `generate`, the one sampling
implementation, so a chat reply is exactly what `generate_text` would sample from that prompt.

The context: the rendered conversation plus `max_new_tokens` must fit the model's `block_size`.
When it no longer does, the oldest exchanges (a user message and its reply) are forgotten, as
many as needed; the system prompt and the newest message never are. Cutting the rendered prompt
from the left instead would cut through the system prompt and a message's template markup, which
the model was never trained to continue from.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from scratchlm.errors import ConfigError, ContextTooLongError
from scratchlm.tokenizer.chat_template import chat_stop_ids, chat_template, render_chat
from scratchlm.model.sampling import SamplingConfig, generate
from scratchlm.tokenizer import Tokenizer

Message = dict[str, str]
TextCallback = Callable[[str], None]

CHAT_SAMPLING = SamplingConfig(temperature=0.7, max_new_tokens=512)  # the `chat` command's defaults


def default_max_new_tokens(block_size: int) -> int:
    """512 tokens for a reply, but at most half the context: a model trained here with a
    context of 128 to 512 tokens would otherwise have no room left for the conversation."""
    return max(1, min(CHAT_SAMPLING.max_new_tokens, block_size // 2))


@dataclass
class ChatSession:
    """One conversation. `messages` holds the user and assistant turns, oldest first, always in
    pairs; the system prompt is kept apart (None: the template's own default, if it has one).
    `limit_name` is what messages call the reply's token limit: a CLI names its flag.
    `finish_reason` tells how the last reply ended: "stop" (the model ended its turn), "length"
    (cut at the token limit) or None (none yet, or interrupted)."""

    tokenizer: Tokenizer
    system: str | None = None
    config: SamplingConfig = CHAT_SAMPLING
    messages: list[Message] = field(default_factory=list)
    limit_name: str = "max_new_tokens"
    finish_reason: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        chat_template(self.tokenizer)  # a model without a template fails now, not at the first message
        if self.config.num_samples != 1:
            raise ConfigError(f"chat: num_samples must be 1 (one reply per message), not {self.config.num_samples}")
        stop_ids = tuple(dict.fromkeys(self.config.stop_token_ids + chat_stop_ids(self.tokenizer)))
        self.config = replace(self.config, stop_token_ids=stop_ids)

    def reset(self) -> None:
        """Forget the conversation; the system prompt and settings stay."""
        self.messages.clear()

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (None or "": none). It applies to the whole conversation,
        earlier turns included, as the template renders it first."""
        self.system = text or None

    def conversation(self, user_text: str | None = None) -> list[Message]:
        """The messages the template renders: system prompt, turns, and `user_text` if given."""
        return self._conversation(self.messages, user_text)

    def _conversation(self, turns: list[Message], user_text: str | None) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        new = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + turns + new

    def fit_prompt(self, user_text: str, block_size: int, on_notice: TextCallback | None = None) -> str:
        """The prompt text of the conversation ending with `user_text` and the opening of the
        reply, after forgetting the oldest exchanges that leave no room for `max_new_tokens`."""
        budget = block_size - self.config.max_new_tokens
        dropped = 0
        while True:
            text = render_chat(self.tokenizer, self._conversation(self.messages[dropped:], user_text))
            tokens = len(self.tokenizer.encode(text, allowed_special="all"))
            if tokens <= budget:
                break
            if dropped >= len(self.messages):
                raise ContextTooLongError(self._too_long(tokens, block_size))
            dropped += 2  # one exchange: a user message and its reply
        if dropped:
            del self.messages[:dropped]
            if on_notice is not None:
                exchanges = "exchange" if dropped == 2 else "exchanges"
                on_notice(f"(the conversation outgrew the context of {block_size} tokens: forgot the oldest "
                          f"{dropped // 2} {exchanges})")
        return text

    def _too_long(self, prompt_tokens: int, block_size: int) -> str:
        what = "the message with the system prompt" if self.system else "the message"
        return (
            f"chat: {what} takes {prompt_tokens} tokens, but the context of {block_size} tokens keeps "
            f"{self.config.max_new_tokens} for the reply and leaves {max(block_size - self.config.max_new_tokens, 0)}; "
            f"shorten it or lower {self.limit_name}"
        )

    def reply(
        self, model: nn.Module, user_text: str, on_text: TextCallback | None = None, on_notice: TextCallback | None = None
    ) -> str:
        """The model's reply to `user_text`, streamed piece by piece to `on_text`; both messages
        join the history. `on_notice` hears when old exchanges were forgotten to make room;
        `finish_reason` then says whether the reply was cut at the token limit.

        Interrupted (KeyboardInterrupt), the reply so far joins the history, as the user saw it,
        and the interrupt goes on to the caller."""
        self.finish_reason = None
        prompt = self.fit_prompt(user_text, model.config.block_size, on_notice)
        shown: list[str] = []

        def stream(_: int, piece: str) -> None:
            if on_text is not None:
                on_text(piece)
            shown.append(piece)  # after showing it: a piece whose showing was interrupted is not kept

        try:
            # generate rather than generate_text: the completion says whether it was cut
            (completion,) = generate(model, self.tokenizer, [prompt], self.config, max_batch=1, on_text=stream)
        except KeyboardInterrupt:
            self._remember(user_text, "".join(shown))
            raise
        self._remember(user_text, completion.text)
        self.finish_reason = completion.finish_reason
        return completion.text

    def _remember(self, user_text: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]


# ---- the terminal loop ---------------------------------------------------------------------
HELP = """\
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt; /system alone shows it
/help          this list
/exit          quit (or Ctrl-D); Ctrl-C stops a reply
Start a message with // to send a message that begins with /."""


def run_chat(
    session: ChatSession,
    model: nn.Module,
    read_line: Callable[[str], str],
    write: TextCallback,
    notice: TextCallback | None = None,
    prompt: str = "you> ",
) -> None:
    """Read messages with `read_line(prompt)` (EOFError ends the chat; empty lines are skipped)
    and stream each reply to `write`. Commands start with /. `notice` gets status lines and
    what the commands show (default: `write`); a terminal sends them to stderr so that piped
    output holds only replies."""
    notice = notice or (lambda text: write(text + "\n"))  # notices are lines; `write` takes pieces
    while True:
        try:
            line = read_line(prompt).strip()
        except EOFError:
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            notice("\n(/exit or Ctrl-D quits)")
            continue
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not _run_command(session, line, notice):
                return
            continue
        text = line[1:] if line.startswith("//") else line
        try:
            session.reply(model, text, on_text=write, on_notice=notice)
            write("\n")
            if session.finish_reason == "length":  # else a reply cut mid-word looks like the model's own end
                notice(f"(reply cut at {session.limit_name})")
        except KeyboardInterrupt:
            write("\n")
            notice("(reply stopped)")
        except ContextTooLongError as error:
            notice(f"error: {error}")


def _run_command(session: ChatSession, line: str, notice: TextCallback) -> bool:
    """Carry out one /command; False when the chat should end."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        notice("(conversation forgotten)")
    elif name == "/system" and argument:
        session.set_system(argument)
        notice("(system prompt set)")
    elif name == "/system":
        notice(session.system or "(no system prompt: the chat template's default applies, if it has one)")
    elif name == "/help":
        notice(HELP)
    else:
        notice(f"unknown command {name}; /help lists the commands")
    return True
