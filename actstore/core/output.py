"""Rows out: a polars DataFrame as a table, CSV, JSON or JSON lines, on stdout or in a file."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import polars as pl

from actstore.core.errors import ActstoreError, UsageError
from actstore.core.files import replace_file
from actstore.core.location import store_containing

PRINT_FORMATS = ("table", "csv", "json", "jsonl")
FILE_FORMATS = ("csv", "parquet", "json", "jsonl")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _printable(df: pl.DataFrame) -> pl.DataFrame:
    """Nested columns (lists, structs) as text: CSV cannot hold them."""
    nested = [c for c, t in df.schema.items() if t.is_nested()]
    return df.with_columns(
        pl.col(c).map_elements(_cell, return_dtype=pl.String) for c in nested
    ) if nested else df  # fmt: skip


def render_table(df: pl.DataFrame, max_width: int = 60) -> str:
    """Aligned plain-text columns, every row shown, long cells cut with an ellipsis."""
    headers = list(df.columns)
    rows = [[_cell(v) for v in row] for row in df.iter_rows()]
    rows = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = [df.schema[h].is_numeric() for h in headers]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    lines = [line(headers), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in rows]
    return "\n".join(lines) + "\n"


def write_rows(df: pl.DataFrame, fmt: str, out: IO[str] | None = None) -> None:
    """Print rows to a text stream (stdout by default) in one of PRINT_FORMATS."""
    out = out or sys.stdout
    if fmt == "table":
        out.write(render_table(df))
    elif fmt == "csv":
        out.write(_printable(df).write_csv())
    elif fmt == "json":
        out.write(df.write_json() + "\n")
    elif fmt == "jsonl":
        out.write(df.write_ndjson())
    else:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(PRINT_FORMATS)}")


def check_output_path(target: str | Path, flag: str) -> None:
    """Refuse, before any work, an output file whose directory is missing or not writable, or
    that is, or would land, inside a store: every command that writes a file calls this."""
    path = Path(target).expanduser().absolute()
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {target}: directory {parent} does not exist; create it first")
    refuse_inside_store(path, flag)
    if not os.access(parent, os.W_OK):
        raise ActstoreError(f"{flag} {target}: directory {parent} is not writable")


def refuse_inside_store(target: str | Path, flag: str) -> None:
    """A file written inside a store could overwrite its own files (catalog, chunks, metadata)
    and would be taken for part of it."""
    store = store_containing(target)
    if store is not None:
        raise UsageError(
            f"{flag} {target} is inside the store {store}: writing there could overwrite the "
            "store's own files; choose a path outside it"
        )


def export_frame(df: pl.DataFrame, fmt: str, target: str) -> None:
    """Write rows to a file (or '-' for stdout) in one of FILE_FORMATS."""
    if fmt not in FILE_FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FILE_FORMATS)}")
    if target == "-":
        if fmt == "parquet":
            buf = io.BytesIO()
            df.write_parquet(buf)
            sys.stdout.buffer.write(buf.getvalue())
            sys.stdout.flush()
        else:
            write_rows(df, fmt)
        return

    def write(tmp: Path) -> None:
        if fmt == "parquet":
            df.write_parquet(tmp)
        elif fmt == "csv":
            _printable(df).write_csv(tmp)
        elif fmt == "json":
            df.write_json(tmp)
        else:
            df.write_ndjson(tmp)

    write_atomically(target, write)


def write_atomically(target: str | Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a hidden partial file beside `target`, then rename it into place: a
    reader never sees half a file, a failure leaves none, and it is one line naming the fix.
    A target inside a store is refused here too, whoever forgot to check it first."""
    path = Path(target)
    refuse_inside_store(path, "output")
    try:
        replace_file(path, write)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ActstoreError(f"cannot write {target}: {reason}; choose a writable path") from None


def progress_bar(progress: bool | None, **options: Any) -> Any:
    """The one progress bar (tqdm) of every command: on stderr, never mixed with the results on
    stdout, and shown when `progress` says so (None: when stderr is a terminal). `options` are
    tqdm's (an iterable, total, desc, unit, initial)."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(disable=not show, file=sys.stderr, **options)
