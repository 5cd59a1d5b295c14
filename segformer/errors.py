"""What a user can fix, as one family of errors.

Every error a person can act on (a flag, a file, a key, a value) is a `UserError`, and its message names
the thing and what was expected. Scripts catch `UserError` once, print `error: <message>` and exit with
the error's `exit_code`: the code comes from the type, never from the message's text. Anything else is a
bug, and keeps its traceback.

    UserError              exit 2: bad input
    ├── CheckpointError    a checkpoint, config.json or side file that cannot be read or written
    │   └── WeightLayoutError (segformer.weight_layouts) weights that do not fit the model or a known layout
    ├── DataError          a sample, an annotation, a manifest key, a data source
    ├── ConfigError        a setting that cannot be honoured, or settings that contradict each other
    ├── ExportError        exit 1: a model that cannot be exported, or whose written graph does not reproduce it
    ├── HubError           (training.hub) the hub cannot be used as asked
    ├── RunLocked          (training.run_folder) exit 75: another run holds the folder; try again later
    └── Diverged           (training) exit 1: the loss or the weights stopped being finite
"""


class UserError(Exception):
    """Something the user can fix; the message names the flag, file, key or value, and what was expected."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint (weights, config.json, a side file) that cannot be read, used or written; names the file."""


class DataError(UserError):
    """Bad input data: a file, a sample or a manifest key that is not what it should be; names it."""


def refusal(problems: list[str]) -> DataError:
    """One DataError for every problem found in a file or a folder of them (a labelling tool's export, a
    manifest): its message the first, with how many more there are; `problems` every one, which the dataset
    doctor lists."""
    more = f" (and {len(problems) - 1} more: python -m data doctor lists them)" if len(problems) > 1 else ""
    error = DataError(problems[0] + more)
    error.problems = list(problems)
    return error


class ConfigError(UserError):
    """A setting that cannot be honoured, or settings that contradict each other; names the flag or key."""


class ExportError(UserError):
    """The model cannot be traced, or the written graph does not reproduce it (then the file is there, but
    not to be trusted)."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name where it has none: what a one-line error
    quotes of a library's failure."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
