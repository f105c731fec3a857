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
