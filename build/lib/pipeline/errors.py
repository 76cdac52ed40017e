"""The one user-error type: a one-line message plus how to fix it, never a traceback."""


class LeanvmError(Exception):
    """A mistake the user can fix (bad config, bad signature, missing tool, ...)."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message
