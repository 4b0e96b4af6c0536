"""The one exception type users see.

Every message is a single line that names the file or option at fault and says what to do; the
CLI prints it as ``error: ...`` and exits with status 2, so no user ever reads a traceback for a
mistake of theirs.
"""


class FeatureCacheError(Exception):
    """A user-facing error: one line, names the culprit, says what to do."""
