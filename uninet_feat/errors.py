"""One exception type for every bad input, so the CLI can print it without a traceback."""


class BadInputError(ValueError):
    """A file, folder, checkpoint or value the toolkit cannot use.

    The message names the offending path (when there is one) and says how to fix it; ``reason`` is the
    message alone (no path, no fix), for errors that list several. A message of several lines (such a
    list) gets its fix on a line of its own.
    """

    def __init__(self, message: str, path=None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.reason, self.fix = message, fix
        text = message if self.path is None else f"{self.path}: {message}"
        if fix:
            text += ("\n" if "\n" in text else " ") + f"(fix: {fix})"
        super().__init__(text)
