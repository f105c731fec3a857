"""Token roles: the named positions of a run's prompts (IOI's IO, S1, S1+1, S2; END), read from
the catalog's `prompt_roles` rows. The one reader every position-resolved query uses.

A role's position is the token's index in the model's input (BOS = 0). Prompts of one run may
differ in length, so the same role sits at different positions: a query that lines prompts up
by position must use roles, never absolute indices. END, the final token, is every prompt's
role, also in stores and runs recorded before roles existed (no table, or no rows): those read
as END only. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from actstore.core.errors import UsageError

if TYPE_CHECKING:
    from actstore.core.store import Store

END = "END"
SCHEMA = {"prompt_idx": pl.Int32, "role": pl.String, "pos": pl.Int32}


def run_roles(store: Store, run_id: int) -> pl.DataFrame:
    """Every prompt's roles: `prompt_idx, role, pos`, END included, ordered by prompt and by
    `role_names` order."""
    with store.reading():
        prompts = store._trusted_query(
            "SELECT prompt_idx, seq_len FROM prompts WHERE run_id = ? ORDER BY prompt_idx",
            [run_id],
        )
        rows = (
            store._trusted_query(
                "SELECT prompt_idx, role, pos FROM prompt_roles WHERE run_id = ? AND role <> ?",
                [run_id, END],
            )
            if _has_table(store)
            else pl.DataFrame(schema=SCHEMA)
        )
        names = _names(store, run_id, rows)
    end = prompts.select(
        pl.col("prompt_idx").cast(pl.Int32),
        pl.lit(END).alias("role"),
        (pl.col("seq_len") - 1).cast(pl.Int32).alias("pos"),
    )
    order = pl.DataFrame({"role": names, "_order": list(range(len(names)))})
    return (
        pl.concat([rows.cast(SCHEMA), end])
        .join(order, on="role", how="left")
        .sort("prompt_idx", "_order")
        .drop("_order")
    )


def role_names(store: Store, run_id: int) -> list[str]:
    """The run's role names in the task's order, END last (["END"] for a run without roles)."""
    with store.reading():
        rows = (
            store._trusted_query(
                "SELECT DISTINCT role FROM prompt_roles WHERE run_id = ? AND role <> ?",
                [run_id, END],
            )
            if _has_table(store)
            else pl.DataFrame(schema={"role": pl.String})
        )
        return _names(store, run_id, rows)


def positions(store: Store, run_id: int, roles: Sequence[str]) -> np.ndarray:
    """Per prompt (rows in prompt order), the input position of each of `roles` (columns in
    the order given): an int64 array (n_prompts, len(roles)). A role the run lacks, or that some
    of its prompts lack, is a one-line usage error naming the roles available."""
    frame = run_roles(store, run_id)
    n = frame["prompt_idx"].n_unique()
    available = role_names(store, run_id)
    out = np.empty((n, len(roles)), dtype=np.int64)
    for j, name in enumerate(roles):
        col = frame.filter(pl.col("role") == name)
        if col.is_empty():
            raise UsageError(
                f"run {run_id} has no role {name!r}; its roles: {', '.join(available)}"
            )
        if col.height != n:
            raise UsageError(
                f"role {name!r} is on {col.height} of run {run_id}'s {n} prompts; choose roles "
                f"every prompt has (roles: {', '.join(available)})"
            )
        out[:, j] = col.sort("prompt_idx")["pos"].to_numpy()
    return out


def position_labels(store: Store, run_id: int) -> dict[int | str, str]:
    """Axis labels for a run's positions (int keys) and roles (str keys), as heatmaps and the
    report show them, read from the `position_labels` view (which exports share; its docstring
    in actstore.core.views says how they are made: `5 IO:' Mary'`, `3:' and'`, `7`,
    `END:' to'`). A catalog from before the view, read as it is, labels nothing ({}): positions
    stay numbers and roles names."""
    with store.reading():
        if not _has_table(store, "position_labels"):
            return {}
        rows = store._trusted_query(
            "SELECT pos, role, label FROM position_labels WHERE run_id = ?", [run_id]
        )
    return {(int(pos) if role is None else role): label for pos, role, label in rows.iter_rows()}


def _has_table(store: Store, name: str = "prompt_roles") -> bool:
    """False for a catalog from before the table or view (read, not migrated: readers never
    write)."""
    found = store._trusted_query(
        "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ? "
        "AND table_catalog = current_database()",
        [name],
    )
    return bool(found["n"][0])


def _names(store: Store, run_id: int, rows: pl.DataFrame) -> list[str]:
    """Role names in the order the run's parameters record (the task's), else by name."""
    present = set(rows["role"].to_list())
    params = store.run(run_id, complete=False)["params"]
    recorded = (params.get("roles") or {}).get("names", [])
    ordered = [r for r in recorded if r in present]
    return ordered + sorted(present - set(ordered)) + [END]


@dataclass(frozen=True)
class Chosen:
    """The positions a position-resolved query patches or reads: absolute `positions` (a run
    whose prompts share one length), or `roles` (per prompt, wherever each role sits); both None
    for every position of a same-length run."""

    positions: tuple[int, ...] | None = None
    roles: tuple[str, ...] | None = None


def lengths(store: Store, run_id: int) -> list[int]:
    """The distinct token lengths of the run's prompts (BOS included), ascending."""
    rows = store._trusted_query(
        "SELECT DISTINCT seq_len FROM prompts WHERE run_id = ? ORDER BY seq_len", [run_id]
    )
    return [int(n) for n in rows["seq_len"].to_list()]


def choose(
    store: Store,
    run_id: int,
    given: str | Sequence[int | str] | None,
    option: str = "--positions",
) -> Chosen:
    """Validate a query's positions against the run: role names, or position numbers on a run
    whose prompts share one length (on others a number is a different token in each prompt,
    refused in one line naming the lengths and the roles). None: every role where lengths
    differ, every position where they do not."""
    items = _items(given, option)
    with store.reading():
        sizes = lengths(store, run_id)
        names = role_names(store, run_id)
    numbers = [i for i in items if isinstance(i, int)]
    roles = [i for i in items if isinstance(i, str)]
    if numbers and roles:
        raise UsageError(
            f"{option} {_text(items)}: give role names or position numbers, not both "
            f"(roles: {', '.join(names)})"
        )
    if numbers:
        if len(sizes) > 1:
            raise UsageError(
                f"{option} {_text(items)}: run {run_id}'s prompts have {_and(sizes)} tokens, so "
                f"a position number is a different token in each; give roles: {', '.join(names)}"
            )
        bad = [p for p in numbers if not 0 <= p < sizes[0]]
        if bad:
            raise UsageError(f"{option} {_text(bad)}: give positions in 0..{sizes[0] - 1}")
        return Chosen(positions=tuple(sorted(set(numbers))))
    if not roles:
        return Chosen(roles=tuple(names)) if len(sizes) > 1 else Chosen()
    unknown = [r for r in roles if r not in names]
    if unknown:
        raise UsageError(
            f"{option} {_text(items)}: run {run_id} has no role {unknown[0]!r}; its roles: "
            f"{', '.join(names)}"
        )
    positions(store, run_id, roles)  # every role on every prompt, or a one-line error
    return Chosen(roles=tuple(dict.fromkeys(roles)))


def _items(given: str | Sequence[int | str] | None, option: str) -> list[int | str]:
    """A comma-separated text or a sequence, numbers as ints; empty is refused."""
    if given is None:
        return []
    raw = given.split(",") if isinstance(given, str) else list(given)
    items: list[int | str] = []
    for item in raw:
        if isinstance(item, str):
            text = item.strip()
            if not text:
                raise UsageError(f"{option} {given!r}: an empty entry; give roles like IO,S2,END")
            item = int(text) if text.lstrip("-").isdigit() else text
        items.append(item)
    if not items:
        raise UsageError(f"{option}: give at least one role or position")
    return items


def _text(items: Sequence[int | str]) -> str:
    return ",".join(str(i) for i in items)


def _and(numbers: list[int]) -> str:
    """15, 16 and 19."""
    words = [str(n) for n in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
