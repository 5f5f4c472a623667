"""User-facing errors: each carries a one-line message the CLI prints without a traceback."""


class FlashInferError(Exception):
    """Base class of every error caused by the user's input or files (not by a bug)."""


class ModelFileError(FlashInferError):
    """A model file or folder is missing, corrupt, truncated or of an unknown kind."""


class UnsupportedModelError(FlashInferError):
    """A well-formed model this runtime cannot run (architecture, tensor type, feature)."""


class ArgumentError(FlashInferError):
    """An argument of an API call or a command-line value is of the wrong type or range."""


class ContextLengthError(FlashInferError):
    """The prompt (plus the requested generation) does not fit in the context window."""


def os_error_line(exc: OSError) -> str:
    """An error of the operating system in one line: its cause and the file it names."""
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


def error_kind(name: str) -> type[FlashInferError]:
    """The error class called `name` (an error raised in a child process comes back as the
    same class); FlashInferError for any other name."""
    kinds = {cls.__name__: cls for cls in (FlashInferError, ModelFileError,
                                           UnsupportedModelError, ArgumentError,
                                           ContextLengthError)}
    return kinds.get(name, FlashInferError)
