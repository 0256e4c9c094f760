"""The project's exceptions.

A `ScratchLMError` is a user mistake or a bad input: the CLI prints its message on one line and
exits with status 2. Anything else escaping the library is a bug and keeps its traceback.
"""


class ScratchLMError(Exception):
    """A problem the user can act on; the message says what went wrong and where."""


class InputFileError(ScratchLMError):
    """A file given by the user is missing, empty, unreadable or malformed."""


class ConfigError(ScratchLMError):
    """A setting has an invalid value, or a key that does not exist."""


class SpecialTokenInTextError(ScratchLMError):
    """Text to encode contains a special token's string and the caller did not allow it."""


class ModelFormatError(ScratchLMError):
    """A model file or folder in another format (GGUF, Hugging Face) that we cannot read or
    write: unknown architecture, unsupported quantisation, missing or mis-shaped tensors."""


class ContextTooLongError(ScratchLMError):
    """An example needs more positions than the model's context and truncation was not asked for."""


class TrainingError(ScratchLMError):
    """Training cannot go on (repeated non-finite losses)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error of our own that wraps
    it (libraries go on with tracebacks and advice); its type's name when the message is empty."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
