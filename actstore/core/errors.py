"""Errors that the CLI turns into a one-line message and an exit code, never a traceback."""

from __future__ import annotations


class ActstoreError(Exception):
    """An expected runtime failure: the message names the problem and the fix (exit 1)."""

    exit_code = 1


class UsageError(ActstoreError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class LockedError(ActstoreError):
    """Another process holds the store's writer lock."""


class DamagedError(ActstoreError):
    """Stored data is missing, undecodable or altered: never read as numbers."""


def first_line(error: BaseException | str, limit: int | None = None) -> str:
    """The first line of an error's message (at most `limit` characters): what a one-line error
    quotes of a library's message, which is often several lines long. An empty message gives
    the exception's type name."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else "no detail"
