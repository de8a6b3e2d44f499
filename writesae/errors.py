"""The one error class of writesae's own: a file on disk that is not what was recorded when it was written.

Everything else is a built-in type: ``ValueError`` for a wrong argument (its message says what was expected,
what was found and what to do), ``FileNotFoundError`` for a missing file or directory.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["CorruptFileError"]


class CorruptFileError(ValueError):
    """A file that cannot be parsed or does not match its record (size, header, sha256): truncated, overwritten
    or hand-edited. ``path`` is the file; the message names it, what is wrong and how to rebuild it."""

    def __init__(self, path, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{self.path} is corrupt: {problem}; {fix}")
