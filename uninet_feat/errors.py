"""One exception type for every bad input, so the CLI can print it without a traceback."""


class BadInputError(ValueError):
    """A file, folder, checkpoint or value the toolkit cannot use.

    The message names the offending path (when there is one) and says how to fix it.
    """

    def __init__(self, message: str, path=None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        text = message if self.path is None else f"{self.path}: {message}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)
