"""User-facing errors: the CLI prints these as one line, without a traceback."""


class DeepSeekTFError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ConfigError(DeepSeekTFError):
    """A config file, preset or override is malformed; the message names the key."""


class DataError(DeepSeekTFError):
    """A corpus is missing, empty or not UTF-8; the message names the file."""


class TokenizerError(DeepSeekTFError):
    """Text or token ids the tokenizer cannot represent."""


class InputError(DeepSeekTFError):
    """A prompt or token ids the model cannot take (too long, out of range)."""


class TrainingError(DeepSeekTFError):
    """Training cannot continue (for example the loss became NaN)."""


class RunDirError(DeepSeekTFError):
    """A run directory is missing a file it needs."""


class ConversionError(DeepSeekTFError):
    """A checkpoint cannot be converted; the message names the file, tensor or field."""


class CompressionError(DeepSeekTFError):
    """A compression request the model cannot take; raised before any work starts."""


def check_count(
    flag: str, value, low: int, note: str = "", error: type[DeepSeekTFError] = InputError
) -> None:
    """Raises `error` (`--FLAG: must be >= LOW NOTE, got VALUE`) unless `value` is an
    integer (not a bool) of at least `low`; `note` explains a special value ("(0: all)")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        note = f" {note}" if note else ""
        raise error(f"--{flag}: must be >= {low}{note}, got {value!r}")
