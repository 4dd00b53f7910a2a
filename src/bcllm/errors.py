"""The one error type for bad input from a user of the library.

`InputError` names the parameter that was wrong (`param`, the library's own name, e.g.
"block_size") and says what is allowed. Library code raises only this for bad input; the CLI
alone translates `param` into a flag and exits with status 2. Any other exception is a bug and
keeps its traceback.

It subclasses ValueError and TypeError so that code catching those (the usual Python contract
for bad arguments) keeps working; `InputFileError` is also a FileNotFoundError.
"""

from __future__ import annotations


class InputError(ValueError, TypeError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InputFileError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what it should be."""

    def __init__(self, message: str, param: str | None = None):
        InputError.__init__(self, message, param)
