"""The one exception type users see: a one-line message that names the file and the fix."""


class LookalikeError(ValueError):
    """Bad input or a mismatch between stages; the CLI prints it as ``error: <message>``."""
