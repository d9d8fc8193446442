"""The one way errors reach a user: what is wrong, where, and how to fix it."""

from __future__ import annotations

import errno


class PrepError(Exception):
    """A user-facing error. The CLI prints it as one line and exits non-zero.

    `where` names the file, key, line, shard or sample; `fix` says what to do about it.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [self.what]
        if self.where:
            parts.insert(0, f"{self.where}:")
        text = " ".join(parts)
        if self.fix:
            text += f" — fix: {self.fix}"
        return text

    def __reduce__(self):  # keep the three fields across process pools
        return (type(self), (self.what, self.where, self.fix))


class PrepErrorGroup(PrepError):
    """Several independent errors (all config problems at once); the CLI prints one line for each."""

    def __init__(self, errors: list[PrepError]) -> None:
        self.errors = errors
        super().__init__(errors[0].what, errors[0].where, errors[0].fix)

    def __reduce__(self):
        return (type(self), (self.errors,))


_OS_FIXES = {  # errno -> what to do: the errors a full, read-only or locked-down disk gives anywhere
    errno.ENOSPC: "free space on that disk (or write to another), then run again: finished work is kept",
    errno.EDQUOT: "free space within your quota (or write elsewhere), then run again: finished work is kept",
    errno.EROFS: "write to a folder on a writable file system",
    errno.EACCES: "give this user access to it, or choose another path",
}


def unexpected_line(err: BaseException) -> str:
    """One line for an error that is not a PrepError: its type and text, and for the OS errors any stage
    may meet (a full disk, no permission) how to fix them."""
    text = f"{type(err).__name__}: {err}"
    fix = _OS_FIXES.get(err.errno) if isinstance(err, OSError) and err.errno is not None else None
    return f"{text} — fix: {fix}" if fix else text
