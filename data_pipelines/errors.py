"""The one base class of every error a user can fix (bad config, data, paths, requests).

Every command turns a `UserError` into a single `error: ...` line and exit code 2
(`data_pipelines.cli.run_main`); anything else is a bug and keeps its traceback. This module
sits at the bottom of the import graph, so every layer above can raise these.
"""


class UserError(ValueError):
    """Bad input the user can fix; the message is one line naming the key, file or flag."""


class DataError(UserError):
    """A data source or record is unusable; the message names the file (and line)."""


class TokenizerError(UserError):
    """A tokenizer file is missing, unreadable or unfit for this project."""
