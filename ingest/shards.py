"""Sharded ingest: N processes (on one machine or several sharing the store) each write a
disjoint, chunk-aligned prompt range, and `merge` folds their manifests into the catalog.

A shard never opens the catalog for writing. It writes its chunks into staged arrays
`arrays.zarr/staged/<params_hash>/<side>/<hook>` (one writer per Zarr chunk, since shards own
whole chunks) and, once every chunk is durable, a manifest
`manifests/run-<params_hash>/shard-<i>-of-<N>.json` holding its prompt rows, its chunk ledger
rows with checksums, and the run's parameters. `merge` is the single catalog writer: under the
writer lock it creates (or resumes) the run, and only when every shard's manifest is there does
it move the staged arrays to `run<id>/` and record prompts, ledger and arrays, marking the run
complete. Every step is idempotent, so an interrupted merge is finished by running it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import polars as pl
import zarr

from actstore import arrays as zarrays
from actstore.catalog import Catalog
from actstore.errors import ActstoreError, UsageError
from actstore.location import arrays_url, local_dir
from actstore.lock import WriterLock
from actstore.store import CATALOG, Store

if TYPE_CHECKING:
    from actstore.models import ModelAdapter
    from ingest.runner import Prepared

MANIFESTS = "manifests"
MERGED = "merged"
STAGED = "staged"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`: a contiguous range of whole chunks."""

    index: int
    count: int

    def chunk_range(self, n_chunks: int) -> tuple[int, int]:
        return self.index * n_chunks // self.count, (self.index + 1) * n_chunks // self.count

    @property
    def label(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def parse_shard(text: str) -> Shard:
    """`"i/N"` -> Shard(i, N), with 0 <= i < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(
            f"--shard {text}: write it as i/N, e.g. 0/4 (shards count from 0)"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need N >= 1 and 0 <= i < N (shards count from 0)")
    return Shard(index, count)


def manifest_dir(store_dir: Path, phash: str) -> Path:
    return store_dir / MANIFESTS / f"run-{phash}"


def staged_name(phash: str) -> str:
    return f"{STAGED}/{phash}"


@contextmanager
def _creation_lock(directory: Path) -> Iterator[None]:
    """Serialise array creation between the shards of one run on a shared filesystem."""
    fd = os.open(directory / ".create.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# The prompts columns that hold lists of token ids.
TOKEN_LISTS = ("clean_tokens", "corrupted_tokens", "answer_tokens", "wrong_answer_tokens")


def prompt_records(prep: Prepared, lo: int, hi: int, metrics: dict) -> list[dict[str, Any]]:
    """The `prompts` rows of prompts [lo, hi), keyed by column, without the run id: what both
    the ingest runner and a shard's manifest record."""
    records = []
    for j, i in enumerate(range(lo, hi)):
        pair, length = prep.pairs[i], int(prep.lengths[i])
        records.append(
            {
                "prompt_idx": i,
                "clean_text": pair.clean,
                "corrupted_text": pair.corrupted,
                "answer": pair.answer,
                "wrong_answer": pair.wrong_answer,
                **{name: float(values[j]) for name, values in metrics.items()},
                "answer_token": int(prep.answers[i]),
                "wrong_answer_token": int(prep.wrong[i]),
                "seq_len": length,
                "clean_tokens": prep.clean[i, :length].tolist(),
                "corrupted_tokens": prep.corrupted[i, :length].tolist(),
                "grp": pair.group,
                "answers": list(pair.correct()),
                "wrong_answers": list(pair.incorrect()),
                "answer_tokens": prep.answer_sets[i],
                "wrong_answer_tokens": prep.wrong_sets[i],
            }
        )
    return records


def model_record(model: ModelAdapter) -> dict[str, Any]:
    """The `models` row of a model, by column name."""
    s = model.shape
    return {
        "model": model.spec, "fingerprint": model.fingerprint, "source": model.source,
        "n_layers": s.n_layers, "n_heads": s.n_heads, "d_model": s.d_model, "d_head": s.d_head,
        "d_mlp": s.d_mlp, "d_vocab": s.d_vocab, "n_ctx": s.n_ctx,
        "architecture": model.architecture.to_json(),
    }  # fmt: skip


def insert_model(con: Any, model: dict[str, Any]) -> None:
    """Record a model's row unless the store has it."""
    con.execute(
        f"INSERT OR IGNORE INTO models ({', '.join(model)}, created_at) VALUES "
        f"({', '.join('?' for _ in model)}, now())",
        list(model.values()),
    )


def _write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    zarrays.fsync_path(path)


def ingest_shard(
    location: str | Path,
    shard: Shard,
    model: ModelAdapter,
    prep: Prepared,
    params: dict,
    progress: bool | None,
) -> pl.DataFrame:
    """Write shard `shard`'s chunks into the staged arrays, then its manifest; no catalog write."""
    from tqdm import tqdm

    from ingest.runner import _array_shapes, _compute_batch, _params_hash

    started = time.monotonic()
    phash = _params_hash(params)
    n, seq = prep.clean.shape
    batch = params["batch_size"]
    n_chunks = (n + batch - 1) // batch
    first, stop = shard.chunk_range(n_chunks)
    store_dir = local_dir(location)
    mdir = manifest_dir(store_dir, phash)
    mdir.mkdir(parents=True, exist_ok=True)
    url, options = arrays_url(location)
    shapes = _array_shapes(model, params, n, seq)
    with _creation_lock(mdir):
        root = zarr.open_group(url, mode="a", storage_options=options or None)
        arrays = {
            key: zarrays.create_array(
                root, f"{staged_name(phash)}/{key[0]}/{key[1]}", shape, batch, dt, replace=False
            )
            for key, (shape, dt) in shapes.items()
        }
    prompts: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    show = sys.stderr.isatty() if progress is None else progress
    for b in tqdm(range(first, stop), disable=not show, file=sys.stderr, unit="batch",
                  desc=f"ingest {shard.label}"):  # fmt: skip
        lo, hi = b * batch, min(n, (b + 1) * batch)
        values, metrics = _compute_batch(model, prep, params, lo, hi)
        for (side, hook), arr in arrays.items():
            data = values[(side, hook)].astype(arr.dtype, copy=False)
            arr[lo:hi] = data
            name = f"{staged_name(phash)}/{side}/{hook}"
            zarrays.fsync_path(zarrays.chunk_file(store_dir, name, b, arr.ndim))
            ledger.append(
                {"side": side, "hook": hook, "chunk_idx": b, "prompt_start": lo,
                 "prompt_stop": hi, "checksum": zarrays.checksum(data), "nbytes": data.nbytes}
            )  # fmt: skip
        prompts.extend(prompt_records(prep, lo, hi, metrics))
    path = mdir / f"{shard.label}.json"
    _write_atomic(
        path,
        {
            "format": MANIFEST_FORMAT,
            "params_hash": phash,
            "params": params,
            "shard": shard.index,
            "n_shards": shard.count,
            "n_prompts": n,
            "seq_len": seq,
            "n_chunks": n_chunks,
            "chunks": [first, stop],
            "model": model_record(model),
            "arrays": [
                {"side": side, "hook": hook, "shape": list(shape), "dtype": dt}
                for (side, hook), (shape, dt) in shapes.items()
            ],
            "prompts": prompts,
            "ledger": ledger,
            "wall_s": time.monotonic() - started,
        },
    )
    return pl.DataFrame(
        [{"params_hash": phash, "shard": shard.index, "n_shards": shard.count,
          "prompt_start": min(n, first * batch), "prompt_stop": min(n, stop * batch),
          "n_chunks": stop - first, "manifest": str(path)}]
    )  # fmt: skip


# ---- merge ---------------------------------------------------------------------------------


def merge(location: str | Path) -> pl.DataFrame:
    """Fold every shard manifest into the catalog; one row per sharded run with its status.

    With nothing left to merge, the runs merged before are listed (a rerun is a no-op)."""
    store_dir = local_dir(location)
    groups = sorted((store_dir / MANIFESTS).glob("run-*")) if store_dir.is_dir() else []
    merged = sorted((store_dir / MANIFESTS / MERGED).glob("run*-*")) if store_dir.is_dir() else []
    if not groups and not merged:
        raise UsageError(
            f"no shard manifests under {store_dir / MANIFESTS}; run actstore ingest … --shard i/N "
            "first"
        )
    store = _open_or_create(location, store_dir)
    with store.writer("actstore merge"):
        if not groups:
            return pl.DataFrame([_merged_row(store, archive) for archive in merged])
        return pl.DataFrame([_merge_run(store, location, group) for group in groups])


def _merged_row(store: Store, archive: Path) -> dict[str, Any]:
    """A run an earlier merge completed, as `merge` reported it then."""
    run_id, phash = archive.name.removeprefix("run").split("-", 1)
    shards = len(list(archive.glob("shard-*-of-*.json")))
    status = store.query("SELECT status FROM runs WHERE run_id = ?", [int(run_id)])["status"]
    return {"run_id": int(run_id), "params_hash": phash, "n_shards": shards,
            "shards_present": shards, "missing": "",
            "status": status.item() if status.len() else "missing from the catalog"}  # fmt: skip


def _open_or_create(location: str | Path, store_dir: Path) -> Store:
    """The store; its catalog is created here when only shards have written so far."""
    if not (store_dir / CATALOG).exists():
        lock = WriterLock(store_dir)
        lock.acquire("actstore merge (create catalog)")
        try:
            catalog = Catalog(store_dir / CATALOG)
            catalog.writing = True
            catalog.migrate()
        finally:
            lock.release()
    return Store(location)


def _load_manifests(mdir: Path) -> list[dict]:
    manifests = []
    for path in sorted(mdir.glob("shard-*-of-*.json")):
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ActstoreError(f"{path}: unknown manifest format; rerun that shard")
        manifests.append(manifest)
    counts = sorted({m["n_shards"] for m in manifests})
    if len(counts) > 1:
        raise ActstoreError(
            f"{mdir} holds manifests of different shard counts {counts}; delete the stale ones "
            "and rerun those shards"
        )
    return manifests


def _merge_run(store: Store, location: str | Path, mdir: Path) -> dict[str, Any]:
    phash = mdir.name.removeprefix("run-")
    manifests = _load_manifests(mdir)
    if not manifests:
        return {"run_id": None, "params_hash": phash, "n_shards": 0, "shards_present": 0,
                "missing": "all", "status": "no manifests"}  # fmt: skip
    first = manifests[0]
    count = first["n_shards"]
    present = sorted(m["shard"] for m in manifests)
    missing = sorted(set(range(count)) - set(present))
    _check_model(store, first["model"])
    fs, root = fsspec.core.url_to_fs(arrays_url(location)[0])
    staged = f"{root}/{staged_name(phash)}"
    run_id, merged = _claim_run(store, first, phash, fs.exists(staged))
    row = {"run_id": run_id, "params_hash": phash, "n_shards": count,
           "shards_present": len(present), "missing": ",".join(map(str, missing))}  # fmt: skip
    if merged:
        _archive(mdir, run_id)
        return {**row, "status": "complete"}
    if missing:
        return {**row, "status": "ingesting"}
    ledger = _check_coverage(manifests)
    target = f"{root}/run{run_id}"  # the group holding zarrays.array_name(run_id, side, hook)
    # every shard has finished: a temporary file left in the staged arrays is a killed write's
    zarrays.remove_partial_files(store.path / zarrays.ARRAYS / staged_name(phash))
    if fs.exists(staged):
        if fs.exists(target):
            fs.rm(target, recursive=True)
        fs.mv(staged, target, recursive=True)
    elif not fs.exists(target):
        raise ActstoreError(f"run {run_id}: staged arrays {staged} are missing; rerun every shard")
    _record_run(store, run_id, manifests, ledger)
    _archive(mdir, run_id)
    return {**row, "status": "complete"}


def _check_model(store: Store, model: dict) -> None:
    """The fingerprint check a shard could not make: one model per store."""
    for row in store.query("SELECT model, fingerprint FROM models").to_dicts():
        if row["fingerprint"] != model["fingerprint"]:
            raise UsageError(
                f"store {store.path} holds activations of model {row['model']!r}; the shards "
                f"ran {model['model']!r}, a different model: ingest them into a new store"
            )


def _claim_run(store: Store, manifest: dict, phash: str, staged: bool) -> tuple[int, bool]:
    """The run id the shards fill (an interrupted run with equal parameters, or a new one), and
    whether a previous merge already completed it."""
    params = manifest["params"]
    with store.catalog.write() as con:
        latest = con.execute(
            "SELECT run_id, status FROM runs WHERE params_hash = ? ORDER BY run_id DESC LIMIT 1",
            [phash],
        ).fetchall()
        if latest and latest[0][1] == "complete" and not staged:
            return int(latest[0][0]), True
        if latest and latest[0][1] in ("ingesting", "failed"):
            run_id = int(latest[0][0])
            con.execute("UPDATE runs SET status = 'ingesting' WHERE run_id = ?", [run_id])
        else:
            run_id = store.next_id(con, "runs", "run_id")
            run = {
                "run_id": run_id, "model": params["model"], "task": params["task"],
                "corruption": params["corruption"], "n_prompts": manifest["n_prompts"],
                "status": "ingesting", "params": json.dumps(params, sort_keys=True),
                "params_hash": phash, "seq_len": manifest["seq_len"], "dtype": params["dtype"],
                "batch_size": params["batch_size"], "seed": params["seed"],
                "hooks": json.dumps(params["hooks"]), "dataset": params.get("dataset"),
            }  # fmt: skip
            columns = ", ".join(run)
            con.execute(
                f"INSERT INTO runs ({columns}, created_at) VALUES "
                f"({', '.join('?' for _ in run)}, now())",
                list(run.values()),
            )
        insert_model(con, manifest["model"])
    return run_id, False


def _check_coverage(manifests: list[dict]) -> list[dict]:
    """Every (side, hook, chunk) of the run exactly once across the shards' ledgers."""
    first = manifests[0]
    keys = [(a["side"], a["hook"]) for a in first["arrays"]]
    expected = {(side, hook, b) for side, hook in keys for b in range(first["n_chunks"])}
    ledger = [row for m in manifests for row in m["ledger"]]
    seen = [(row["side"], row["hook"], row["chunk_idx"]) for row in ledger]
    if len(seen) != len(set(seen)) or set(seen) != expected:
        raise ActstoreError(
            f"shard ledgers of run {first['params_hash']} cover {len(set(seen))} of "
            f"{len(expected)} chunks ({len(seen)} rows); rerun the shards"
        )
    return ledger


def _insert(con: Any, table: str, frame: pl.DataFrame) -> None:
    con.register("incoming", frame.to_arrow())
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
    con.unregister("incoming")


def _record_run(store: Store, run_id: int, manifests: list[dict], ledger: list[dict]) -> None:
    """Prompts, chunk ledger and arrays rows of the merged run, and its completion: one
    transaction."""
    first = manifests[0]
    prompts = pl.DataFrame([p for m in manifests for p in m["prompts"]]).with_columns(
        pl.lit(run_id).alias("run_id"),
        pl.col(*TOKEN_LISTS).cast(pl.List(pl.Int32)),
    )
    chunks = pl.DataFrame(ledger).with_columns(pl.lit(run_id).alias("run_id"))
    arrays = []
    for a in first["arrays"]:
        name = zarrays.array_name(run_id, a["side"], a["hook"])
        arr = zarrays.open_root(store.path)[name]
        arrays.append(
            {"run_id": run_id, "side": a["side"], "hook": a["hook"],
             "shape": json.dumps(a["shape"]), "dtype": a["dtype"],
             "chunks": json.dumps(list(arr.chunks)), "codec": zarrays.CODEC_NAME,
             "raw_bytes": int(arr.nbytes), "stored_bytes": zarrays.stored_bytes(store.path, name),
             "path": name, "n_chunks": first["n_chunks"]}
        )  # fmt: skip
    with store.catalog.write() as con:
        for table in ("prompts", "chunks", "arrays"):
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        _insert(con, "prompts", prompts)
        _insert(con, "chunks", chunks)
        _insert(con, "arrays", pl.DataFrame(arrays))
        con.execute("UPDATE chunks SET written_at = now() WHERE run_id = ?", [run_id])
        con.execute(
            "UPDATE runs SET status = 'complete', completed_at = now(), wall_s = ? "
            "WHERE run_id = ?",
            [max(m["wall_s"] for m in manifests), run_id],
        )


def _archive(mdir: Path, run_id: int) -> None:
    """Move a merged run's manifests aside so that later merges skip them (kept as a record)."""
    target = mdir.parent / MERGED / f"run{run_id}-{mdir.name.removeprefix('run-')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        for old in target.iterdir():
            old.unlink()
        target.rmdir()
    os.replace(mdir, target)
