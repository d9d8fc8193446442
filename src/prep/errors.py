"""The one way errors reach a user: what is wrong, where, and how to fix it; and how an error or a
warning line is shown on a terminal."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.text import Text


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


def terminal_text(s: str) -> Text:
    """Text from data (tar member names, captions, errors quoting them) as it may reach a terminal:
    control and format characters escaped (`\\x1b`), so a shard cannot move the cursor, retitle the
    window or reorder the line (bidi overrides); rich markup is not read either (a `Text`)."""
    from rich.text import Text

    return Text("".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in s))


def labelled_line(label: str, line: str) -> Text:
    """`error: ...` in bold red or `warning: ...` in bold yellow, the line as `terminal_text`."""
    from rich.text import Text

    return Text(f"{label}: ", style="bold red" if label == "error" else "bold yellow") + terminal_text(line)
