"""`actstore verify`: every recorded chunk against its ledger checksum, every run for completeness.

Reads only the store (no model, no torch). Each finding is one row naming the run, side, hook,
chunk and prompt range; `problem` is one of:

- `damaged`: the chunk's decoded values do not match the ledger checksum, or do not decode; or
  an array's metadata (`zarr.json`) says other than the document the catalog records (its
  chunks are then not read), or the arrays' root group metadata is not a Zarr group's;
- `missing`: the ledger records a chunk whose file (or whole array) is gone, or the arrays'
  root group metadata (`arrays.zarr/zarr.json`) is gone;
- `unrecorded`: a complete run whose ledger lacks a chunk of one of its arrays;
- `missing-prompts`: a complete run whose prompts table lacks a range of prompt indices;
- `incomplete`: a run still `ingesting` or `failed` (not damage: rerun its ingest to resume).

Every problem but `incomplete` makes the store fail verification.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from actstore.core import arrays as zarrays
from actstore.core.arrays import open_array
from actstore.core.errors import first_line
from actstore.core.store import Store
from actstore.core.verified import ChunkProblem, LedgerEntry, read_checked

# Where a finding is: shared by verify's findings and repair's results.
PIECE = {
    "run_id": pl.Int64,
    "side": pl.String,
    "hook": pl.String,
    "chunk_idx": pl.Int64,
    "prompt_start": pl.Int64,
    "prompt_stop": pl.Int64,
}
COLUMNS = {**PIECE, "problem": pl.String, "detail": pl.String}
NOT_DAMAGE = ("incomplete",)
REPAIRABLE = ("damaged", "missing")


def verify(store: Store, run_id: int | None = None) -> pl.DataFrame:
    """Findings for every run (or one), an empty frame when the store is sound."""
    runs = store.runs() if run_id is None else store.runs().filter(pl.col("run_id") == run_id)
    if run_id is not None and runs.is_empty():
        store.run(run_id)  # raises the usual "run R is not in STORE" usage error
    findings: list[dict[str, Any]] = []
    root_problem = zarrays.root_problem(store.arrays_root) if not runs.is_empty() else None
    if root_problem is not None:
        findings.append(
            {"run_id": None, "side": None, "hook": None, "chunk_idx": None, "prompt_start": None,
             "prompt_stop": None, "problem": "missing" if root_problem == "is gone" else "damaged",
             "detail": f"{store.arrays_root.show('zarr.json')} (the arrays' root group) "
             f"{root_problem}"}
        )  # fmt: skip
    opened: dict[str, Any] = {}
    for run in runs.iter_rows(named=True):
        rid = int(run["run_id"])
        ledger = store._trusted_query(
            "SELECT * FROM chunks WHERE run_id = ? ORDER BY side, hook, chunk_idx", [rid]
        )
        bad_metadata = _check_metadata(store, opened, rid)
        findings.extend(bad_metadata.values())
        for row in ledger.iter_rows(named=True):
            if (row["side"], row["hook"]) in bad_metadata:
                continue  # its chunks read as the wrong metadata says: repair that first
            problem = _check_chunk(store, opened, row)
            if problem is not None:
                findings.append({**_where(row), "problem": problem[0], "detail": problem[1]})
        if run["status"] == "complete":
            findings.extend(_check_complete(store, run, ledger))
        else:
            n_batches = zarrays.batch_count(int(run["n_prompts"]), int(run["batch_size"]))
            done = ledger.group_by("chunk_idx").len().height if ledger.height else 0
            findings.append(
                {"run_id": rid, "side": None, "hook": None, "chunk_idx": None,
                 "prompt_start": None, "prompt_stop": None, "problem": "incomplete",
                 "detail": f"run is {run['status']}: {done} of {n_batches} batches stored; "
                 "rerun its ingest command to resume (or --restart)"}
            )  # fmt: skip
    return pl.DataFrame(findings, schema=COLUMNS)


def failures(findings: pl.DataFrame) -> pl.DataFrame:
    """The findings that mean damage (everything but a run still being ingested)."""
    return findings.filter(~pl.col("problem").is_in(NOT_DAMAGE))


def chunks_checked(store: Store, run_id: int | None = None) -> int:
    where = "" if run_id is None else f"WHERE run_id = {int(run_id)}"
    return int(store._trusted_query(f"SELECT count(*) AS n FROM chunks {where}")["n"].item())


def _where(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("run_id", "side", "hook", "chunk_idx", "prompt_start",
                                "prompt_stop")}  # fmt: skip


def _check_metadata(store: Store, opened: dict[str, Any], run_id: int) -> dict[tuple, dict]:
    """A `damaged` finding per array of the run whose `zarr.json` says other than the document
    the catalog records (shape, chunks, dtype, codecs, fill value), by (side, hook)."""
    out = {}
    for row in store.arrays(run_id).iter_rows(named=True):
        expected = zarrays.expected_metadata(row)
        name = zarrays.array_name(run_id, row["side"], row["hook"])
        try:
            arr = opened.setdefault(name, open_array(store.arrays_root, name))
        except Exception:  # gone or unreadable: each of its chunks is reported missing
            continue
        difference = None if expected is None else zarrays.metadata_difference(arr, expected)
        if difference is not None:
            out[(row["side"], row["hook"])] = {
                **{k: None for k in PIECE}, "run_id": run_id, "side": row["side"],
                "hook": row["hook"], "problem": "damaged",
                "detail": f"metadata {store.arrays_root.show(name)}/zarr.json {difference}",
            }  # fmt: skip
    return out


def _check_chunk(store: Store, opened: dict[str, Any], row: dict[str, Any]) -> tuple | None:
    """(problem, detail) for one ledger row, or None when the chunk matches its checksum."""
    name = zarrays.array_name(row["run_id"], row["side"], row["hook"])
    try:
        if name not in opened:
            opened[name] = open_array(store.arrays_root, name)
        arr = opened[name]
    except Exception as exc:  # gone, or metadata zarr cannot read
        return "missing", f"array {name} cannot be opened: {first_line(exc)}"
    entry = LedgerEntry(row["prompt_start"], row["prompt_stop"], row["checksum"])
    try:
        read_checked(arr, store.arrays_root, name, entry)
    except ChunkProblem as problem:
        return problem.problem, problem.detail
    return None


def _check_complete(store: Store, run: dict[str, Any], ledger: pl.DataFrame) -> list[dict]:
    """A complete run has every chunk of every array in its ledger, and every prompt row."""
    rid, n = int(run["run_id"]), int(run["n_prompts"])
    batch = int(run["batch_size"])
    n_batches = zarrays.batch_count(n, batch)
    out: list[dict[str, Any]] = []
    recorded = {(r["side"], r["hook"], r["chunk_idx"]) for r in ledger.iter_rows(named=True)}
    for arr in store.arrays(rid).iter_rows(named=True):
        for b in range(n_batches):
            if (arr["side"], arr["hook"], b) not in recorded:
                start, stop = zarrays.batch_bounds(b, batch, n)
                out.append(
                    {"run_id": rid, "side": arr["side"], "hook": arr["hook"], "chunk_idx": b,
                     "prompt_start": start, "prompt_stop": stop,
                     "problem": "unrecorded", "detail": "the chunk ledger lacks this chunk"}
                )  # fmt: skip
    have = set(
        store._trusted_query("SELECT prompt_idx FROM prompts WHERE run_id = ?", [rid])["prompt_idx"]
    )
    for lo, hi in _gaps(have, n):
        out.append(
            {"run_id": rid, "side": None, "hook": None, "chunk_idx": None, "prompt_start": lo,
             "prompt_stop": hi, "problem": "missing-prompts",
             "detail": f"prompts {lo}..{hi - 1} have no row in the prompts table"}
        )  # fmt: skip
    return out


def _gaps(have: set[int], n: int) -> list[tuple[int, int]]:
    """Maximal ranges [lo, hi) of 0..n-1 absent from `have`."""
    gaps, lo = [], None
    for i in range(n + 1):
        missing = i < n and i not in have
        if missing and lo is None:
            lo = i
        elif not missing and lo is not None:
            gaps.append((lo, i))
            lo = None
    return gaps
