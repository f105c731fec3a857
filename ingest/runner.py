"""The ingest runner: run a model on clean and corrupted prompts, write activations batch by batch.

Order of events for each batch: run both sides, write every array's chunk, make the chunks
durable, then record prompts and chunk ledger rows in one catalog transaction. A killed ingest
therefore leaves whole batches recorded or not at all, and rerunning the same command resumes at
the first batch the ledger lacks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from actstore import arrays as zarrays
from actstore.errors import ActstoreError, UsageError
from actstore.location import local_dir
from actstore.models import ModelAdapter, load_model
from actstore.store import CATALOG, Store
from ingest.corruptions import (
    NOISE_SIGMAS,
    check_corruption,
    embedding_sigma,
    gaussian_noise,
    subject_positions,
)
from ingest.hooks import resolve_hooks
from ingest.preflight import check_ingest
from ingest.shards import (
    TOKEN_LISTS,
    ingest_shard,
    insert_model,
    model_record,
    parse_shard,
    prompt_records,
)
from ingest.tasks import PromptPair, get_task, validate_pairs

DEFAULT_N = 64
SIDES = ("clean", "corrupted")


@dataclass
class Prepared:
    """Everything an ingest needs, computed before the store is touched."""

    pairs: list[PromptPair]
    clean: np.ndarray  # (n, seq) int32, right-padded
    corrupted: np.ndarray
    lengths: np.ndarray  # (n,) real token counts, BOS included
    answers: np.ndarray  # (n,) token ids
    wrong: np.ndarray
    answer_sets: list[list[int]]  # per prompt, the correct answer set's token ids
    wrong_sets: list[list[int]]
    subjects: list[list[int]]  # per prompt, positions Gaussian noising touches


def _prepare(model: ModelAdapter, pairs: list[PromptPair], corruption: str) -> Prepared:
    n = len(pairs)
    clean_ids = [model.tokenize(p.clean) for p in pairs]
    corrupted_ids = (
        clean_ids if corruption == "gaussian" else [model.tokenize(p.corrupted) for p in pairs]
    )
    lengths = np.array([len(t) for t in clean_ids], dtype=np.int32)
    seq = int(lengths.max())
    if seq > model.shape.n_ctx:
        raise UsageError(
            f"prompts are up to {seq} tokens but the model's context is {model.shape.n_ctx}; "
            "use shorter prompts"
        )
    clean = np.full((n, seq), model.pad_id, dtype=np.int32)
    corrupted = np.full((n, seq), model.pad_id, dtype=np.int32)
    for i, (c, k) in enumerate(zip(clean_ids, corrupted_ids, strict=True)):
        clean[i, : len(c)] = c
        corrupted[i, : len(k)] = k
    answers = np.array([model.token_ids(p.answer)[0] for p in pairs], dtype=np.int32)
    wrong = np.array([model.token_ids(p.wrong_answer)[0] for p in pairs], dtype=np.int32)
    ids: dict[str, int] = {}  # answer sets repeat across pairs: tokenize each answer once
    for a in {a for p in pairs for a in (*p.correct(), *p.incorrect())}:
        ids[a] = model.token_ids(a)[0]
    answer_sets = [[ids[a] for a in p.correct()] for p in pairs]
    wrong_sets = [[ids[a] for a in p.incorrect()] for p in pairs]
    subjects = (
        [subject_positions(model, p.clean, p.subject_words) for p in pairs]
        if corruption == "gaussian"
        else [[] for _ in pairs]
    )
    return Prepared(pairs, clean, corrupted, lengths, answers, wrong, answer_sets, wrong_sets,
                    subjects)  # fmt: skip


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _load_pairs(
    model: ModelAdapter, task: str | None, dataset: str | None, n: int | None, seed: int
) -> tuple[str, list[PromptPair], dict]:
    if dataset is not None:
        from ingest.datasets import load_dataset

        path = Path(dataset)
        if not path.is_file():
            raise UsageError(f"--dataset {dataset}: no such file")
        pairs = load_dataset(path, model)
        if n is not None:
            pairs = pairs[:n]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        source = {"dataset": str(path.resolve()), "dataset_sha256": digest}
        name = task or path.stem
        validate_pairs(pairs, model, source=str(path))
        return name, pairs, source
    if task is None:
        raise UsageError("give --task NAME or --dataset FILE")
    generator = get_task(task)
    pairs = generator.generate(n if n is not None else DEFAULT_N, seed, model)
    validate_pairs(pairs, model, source=f"task {task}")
    return task, pairs, {}


def ingest(
    store_path: str | Path,
    model: str | ModelAdapter = "toy",
    task: str | None = None,
    n: int | None = None,
    corruption: str = "str",
    hooks: str | None = None,
    dataset: str | None = None,
    dtype: str = "float32",
    batch_size: int = 32,
    device: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    shard: str | None = None,
    restart: bool = False,
    again: bool = False,
) -> pl.DataFrame:
    """Ingest a task (or a dataset file) into a store; returns the run's `runs` row, with an
    `outcome` column: new, resumed, restarted, or existing.

    A complete run with the same parameters is returned as it is (`again=True` makes a new run
    instead); an interrupted one is resumed, or with `restart=True` discarded and ingested again
    under the same run id. With `shard="i/N"` only shard i's chunks are written and a manifest
    replaces the catalog writes (see ingest.shards); returns the shard's row.

    `model` is a model spec for `load_model`, or an already loaded ModelAdapter.
    """
    check_ingest(store_path, model if isinstance(model, str) else None, task, n, dataset, dtype,
                 batch_size, device, seed, shard)  # fmt: skip
    check_corruption(corruption)
    location, store_path = store_path, local_dir(store_path)
    part = parse_shard(shard) if shard is not None else None
    existing = (store_path / CATALOG).exists()
    # create=True finishes creating a store whose first ingest was killed early; a valid store
    # is opened as it is (nothing is written before the inputs are checked).
    store = Store(store_path, create=True) if existing else None
    if store is not None and part is None:
        store.lock.acquire()
    try:
        adapter = model if isinstance(model, ModelAdapter) else load_model(model, device)
        if store is not None:
            _check_same_model(store, adapter)
        hook_names = resolve_hooks(adapter, hooks)
        if dataset is None:  # before generating maybe millions of prompts: a sample's length
            sample = get_task(task).generate(min(n or DEFAULT_N, 16), seed, adapter)
            seq = max(len(adapter.tokenize(p.clean)) for p in sample)
            _check_space(store_path, adapter, hook_names, dtype, corruption, n or DEFAULT_N, seq)
        task_name, pairs, source = _load_pairs(adapter, task, dataset, n, seed)
        if not pairs:
            raise UsageError("the dataset holds no prompt pairs")
        prepared = _prepare(adapter, pairs, corruption)
        n_pairs, seq = prepared.clean.shape
        _check_space(store_path, adapter, hook_names, dtype, corruption, n_pairs, seq)
        params = {
            "model": adapter.spec,
            "fingerprint": adapter.fingerprint,
            "task": task_name,
            "n": n_pairs,
            "corruption": corruption,
            "hooks": hook_names,
            "dtype": dtype,
            "batch_size": min(batch_size, n_pairs),  # a chunk never pads beyond the prompts
            "seed": seed,
            "seq_len": int(seq),
            **source,
        }
        if corruption == "gaussian":
            params["noise_std"] = NOISE_SIGMAS * embedding_sigma(adapter)
        if part is not None:
            return ingest_shard(location, part, adapter, prepared, params, progress)
        if store is None:
            store = Store(store_path, create=True)
            store.lock.acquire()
        with store.writer():
            return _run(store, adapter, prepared, params, progress, restart, again)
    finally:
        if store is not None:
            store.lock.release()


def _check_space(
    store_path: Path,
    model: ModelAdapter,
    hooks: list[str],
    dtype: str,
    corruption: str,
    n: int,
    seq: int,
) -> None:
    """Refuse an ingest whose activations cannot fit on the disk (even at 2x compression, more
    than real activations reach), counting space that interrupted runs' arrays already hold."""
    params = {"hooks": hooks, "dtype": dtype, "corruption": corruption}
    shapes = _array_shapes(model, params, n, seq)
    need = sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in shapes.values())
    where = next(p for p in [store_path, *store_path.absolute().parents] if p.exists())
    free = shutil.disk_usage(where).free + _resumable_bytes(store_path)
    if need > 2 * free:
        raise ActstoreError(
            f"--n {n}: the activations need about {_size(need)} uncompressed ({len(shapes)} arrays "
            f"of {seq} positions), {where} has {_size(free)} free; ingest fewer prompts, fewer "
            "--hooks, or --dtype float16"
        )


def _resumable_bytes(store_path: Path) -> int:
    """Bytes held by the arrays of interrupted runs (a resume reuses them)."""
    if not (store_path / CATALOG).exists():
        return 0
    runs = Store(store_path).query("SELECT run_id FROM runs WHERE status <> 'complete'")
    return sum(
        p.stat().st_size
        for rid in runs["run_id"].to_list()
        for p in zarrays.run_dir(store_path, rid).rglob("*")
        if p.is_file()
    )


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"


def _check_same_model(store: Store, adapter: ModelAdapter) -> None:
    rows = store.query("SELECT model, fingerprint FROM models").to_dicts()
    for row in rows:
        if row["fingerprint"] != adapter.fingerprint:
            raise UsageError(
                f"store {store.path} holds activations of model {row['model']!r}; "
                f"{adapter.spec!r} is a different model: use a new store for it"
            )


def _run(
    store: Store,
    model: ModelAdapter,
    prep: Prepared,
    params: dict,
    progress: bool | None,
    restart: bool = False,
    again: bool = False,
) -> pl.DataFrame:
    started = time.monotonic()
    phash = _params_hash(params)
    n, seq = prep.clean.shape
    shapes = _array_shapes(model, params, n, seq)
    with store.catalog.write() as con:
        complete = con.execute(
            "SELECT run_id FROM runs WHERE params_hash = ? AND status = 'complete' "
            "ORDER BY run_id DESC LIMIT 1",
            [phash],
        ).fetchall()
        resumable = con.execute(
            "SELECT run_id FROM runs WHERE params_hash = ? AND status IN ('ingesting', 'failed') "
            "ORDER BY run_id DESC LIMIT 1",
            [phash],
        ).fetchall()
        if complete and not again:  # done before: nothing to write
            return _row(store, int(complete[0][0]), "existing")
        # A run this command creates (or restarts) is rolled back if the disk fills up.
        created = not resumable or restart
        outcome = "restarted" if resumable and restart else "resumed" if resumable else "new"
        if resumable and restart:
            run_id = int(resumable[0][0])
            for table in ("prompts", "chunks", "arrays"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            con.execute(
                "UPDATE runs SET status = 'ingesting', created_at = now(), completed_at = NULL, "
                "wall_s = NULL WHERE run_id = ?",
                [run_id],
            )
        elif resumable:
            run_id = int(resumable[0][0])
            con.execute("UPDATE runs SET status = 'ingesting' WHERE run_id = ?", [run_id])
        else:
            run_id = store.next_id(con, "runs", "run_id")
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, 'ingesting', ?, ?, ?, ?, ?, ?, ?, ?, "
                "now(), NULL, NULL)",
                [
                    run_id,
                    params["model"],
                    params["task"],
                    params["corruption"],
                    n,
                    json.dumps(params, sort_keys=True),
                    phash,
                    seq,
                    params["dtype"],
                    params["batch_size"],
                    params["seed"],
                    json.dumps(params["hooks"]),
                    params.get("dataset"),
                ],
            )
        insert_model(con, model_record(model))
        done = con.execute(
            "SELECT side, hook, chunk_idx FROM chunks WHERE run_id = ?", [run_id]
        ).fetchall()
    done_set = {(side, hook, int(c)) for side, hook, c in done}
    if created:
        zarrays.remove_run(store.path, run_id)
    else:
        zarrays.remove_partial_files(zarrays.run_dir(store.path, run_id))
    batch = params["batch_size"]
    n_batches = (n + batch - 1) // batch
    todo = [b for b in range(n_batches) if any((sd, hk, b) not in done_set for sd, hk in shapes)]
    show = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

    stored = n_batches - len(todo)
    bar = tqdm(total=n_batches, initial=stored, disable=not show, file=sys.stderr,
               desc=f"ingest run {run_id}", unit="batch")  # fmt: skip
    try:
        root = zarrays.open_root(store.path, mode="a")
        arrays = {
            key: zarrays.create_array(root, zarrays.array_name(run_id, *key), shape, batch, dtype)
            for key, (shape, dtype) in shapes.items()
        }
        for b in todo:
            lo, hi = b * batch, min(n, (b + 1) * batch)
            values, metrics = _compute_batch(model, prep, params, lo, hi)
            ledger = write_chunks(store, run_id, arrays, values, b, lo, hi)
            _record_batch(store, run_id, prep, lo, hi, metrics, ledger)
            stored += 1
            bar.update(1)
        bar.close()
        _finish(store, run_id, shapes, params, n_batches, time.monotonic() - started)
    except BaseException as exc:
        bar.close()
        if isinstance(exc, KeyboardInterrupt):
            raise
        err = _fail(store, run_id, exc, rollback=created and _disk_full(exc), kept=stored)
        if err is exc:
            raise
        raise err from exc
    return _row(store, run_id, outcome)


def _row(store: Store, run_id: int, outcome: str) -> pl.DataFrame:
    """The run's `runs` row and what this ingest did to it."""
    row = store.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
    return row.with_columns(pl.lit(outcome).alias("outcome"))


def write_chunks(
    store: Store,
    run_id: int,
    arrays: dict[tuple[str, str], object],
    values: dict[tuple[str, str], np.ndarray],
    chunk_idx: int,
    lo: int,
    hi: int,
) -> list[tuple]:
    """Write one batch's chunk of each array, make it durable, return its ledger rows."""
    ledger = []
    for key, arr in arrays.items():
        data = values[key].astype(arr.dtype, copy=False)
        arr[lo:hi] = data
        name = zarrays.array_name(run_id, *key)
        zarrays.fsync_path(zarrays.chunk_file(store.path, name, chunk_idx, arr.ndim))
        ledger.append((run_id, *key, chunk_idx, lo, hi, zarrays.checksum(data), data.nbytes))
    return ledger


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc)


def _fail(
    store: Store, run_id: int, exc: BaseException, rollback: bool, kept: int
) -> BaseException:
    """Leave the store consistent after a failed batch; return the error to raise.

    Disk full on a run this command created: roll it back (catalog rows first, then arrays, so a
    crash in between never leaves ledger rows without chunks) and the store is as before. Any
    other failure, or disk full while resuming: the run is marked failed and keeps its recorded
    batches; rerunning the same command resumes it. If the catalog cannot be written either, the
    run stays `ingesting`, and the message says that instead.
    """
    try:
        with store.catalog.write() as con:
            if rollback:
                for table in ("prompts", "chunks", "arrays", "runs"):
                    con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
                con.execute("DELETE FROM models WHERE model NOT IN (SELECT model FROM runs)")
            else:
                con.execute("UPDATE runs SET status = 'failed' WHERE run_id = ?", [run_id])
        recorded = True
    except Exception:  # the catalog itself may be out of space; the ledger stays authoritative
        recorded = rollback = False
    if rollback:
        zarrays.remove_run(store.path, run_id)
    if not isinstance(exc, (OSError, ActstoreError)) and not _disk_full(exc):
        return exc
    what = "disk full" if _disk_full(exc) else str(exc).strip().splitlines()[0]
    if rollback:
        return ActstoreError(
            f"{what} while writing run {run_id}; the run was rolled back and the store is "
            "unchanged: free space (see actstore info) and rerun"
        )
    if not recorded:
        return ActstoreError(
            f"{what} while writing run {run_id}; the catalog could not be written either, so "
            f"the run stays ingesting with its {kept} stored batches: fix the cause (free "
            "space) and rerun the same command to resume"
        )
    return ActstoreError(
        f"{what} while writing run {run_id}; it keeps {kept} stored batches and is marked "
        "failed: fix the cause and rerun the same command to resume"
    )


def _array_shapes(
    model: ModelAdapter, params: dict, n: int, seq: int
) -> dict[tuple[str, str], tuple[tuple[int, ...], str]]:
    """Shape and dtype of every array of the run: hooks in the run's dtype, the rest exact."""
    from ingest.hooks import hook_shape

    out: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}
    for side in SIDES:
        out[(side, "tokens")] = ((n, seq), "int32")
        out[(side, "logits")] = ((n, model.shape.d_vocab), "float32")
        for hook in params["hooks"]:
            out[(side, hook)] = ((n, seq, *hook_shape(model, hook, seq)), params["dtype"])
    if params["corruption"] == "gaussian":
        out[("corrupted", "input_embeds")] = ((n, seq, model.shape.d_model), "float32")
    return out


def _compute_batch(
    model: ModelAdapter, prep: Prepared, params: dict, lo: int, hi: int
) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, np.ndarray]]:
    """Both sides' activations for prompts [lo, hi), and their per-prompt metrics."""
    hooks = set(params["hooks"])
    act_dtype = np.float16 if params["dtype"] == "float16" else np.float32
    last = torch.as_tensor(prep.lengths[lo:hi] - 1, dtype=torch.long)
    ans = torch.as_tensor(prep.answers[lo:hi], dtype=torch.long)
    wrong = torch.as_tensor(prep.wrong[lo:hi], dtype=torch.long)
    values: dict[tuple[str, str], np.ndarray] = {}
    metrics: dict[str, np.ndarray] = {}
    for side in SIDES:
        tokens_np = (prep.clean if side == "clean" else prep.corrupted)[lo:hi]
        tokens = torch.as_tensor(tokens_np, dtype=torch.long, device=model.device)
        fwd_hooks = []
        if side == "corrupted" and params["corruption"] == "gaussian":
            noise = torch.zeros(hi - lo, tokens.shape[1], model.shape.d_model)
            for j, i in enumerate(range(lo, hi)):
                pos = prep.subjects[i]
                noise[j, pos] = gaussian_noise(
                    params["seed"], i, (len(pos), model.shape.d_model), params["noise_std"]
                )
            noise = noise.to(model.device)
            fwd_hooks.append(("hook_embed", lambda act, hook, _n=noise: act + _n))
            hooks_for_cache = hooks | {"blocks.0.hook_resid_pre"}
        else:
            hooks_for_cache = hooks
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, hooks_for_cache, fwd_hooks)
        rows = torch.arange(hi - lo)
        final = logits[rows, last.to(logits.device)].float().cpu()
        values[(side, "tokens")] = tokens_np.astype(np.int32)
        values[(side, "logits")] = final.numpy()
        for hook in hooks:
            act = cache[hook].detach().float().cpu().numpy()
            if hook.endswith("hook_pattern") or hook.endswith("hook_attn_scores"):
                act = act.transpose(0, 2, 1, 3)  # (batch, head, q, k) -> (batch, q, head, k)
            values[(side, hook)] = act.astype(act_dtype)
        if side == "corrupted" and params["corruption"] == "gaussian":
            values[(side, "input_embeds")] = (
                cache["blocks.0.hook_resid_pre"].detach().float().cpu().numpy()
            )
        metrics[f"{side}_logit_diff"] = (final[rows, ans] - final[rows, wrong]).numpy()
        metrics[f"{side}_prob"] = final.softmax(-1)[rows, ans].numpy()
    return values, metrics


def _record_batch(
    store: Store,
    run_id: int,
    prep: Prepared,
    lo: int,
    hi: int,
    metrics: dict[str, np.ndarray],
    ledger: list[tuple],
) -> None:
    rows = pl.DataFrame(prompt_records(prep, lo, hi, metrics)).with_columns(
        pl.lit(run_id, dtype=pl.Int32).alias("run_id"), pl.col(*TOKEN_LISTS).cast(pl.List(pl.Int32))
    )
    with store.catalog.write() as con:
        con.execute(
            "DELETE FROM prompts WHERE run_id = ? AND prompt_idx BETWEEN ? AND ?",
            [run_id, lo, hi - 1],
        )
        con.register("incoming", rows.to_arrow())
        con.execute("INSERT INTO prompts BY NAME SELECT * FROM incoming")
        con.unregister("incoming")
        con.executemany(
            "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())", ledger
        )


def _finish(
    store: Store,
    run_id: int,
    shapes: dict[tuple[str, str], tuple[tuple[int, ...], str]],
    params: dict,
    n_batches: int,
    wall_s: float,
) -> None:
    rows = []
    for side, hook in shapes:
        name = zarrays.array_name(run_id, side, hook)
        arr = zarrays.open_root(store.path)[name]
        raw = int(np.prod(arr.shape)) * arr.dtype.itemsize
        rows.append(
            (run_id, side, hook, json.dumps(list(arr.shape)), str(arr.dtype),
             json.dumps(list(arr.chunks)), zarrays.CODEC_NAME, raw,
             zarrays.stored_bytes(store.path, name), name, n_batches)
        )  # fmt: skip
    with store.catalog.write() as con:
        missing = con.execute("SELECT count(*) FROM chunks WHERE run_id = ?", [run_id]).fetchall()[
            0
        ][0]
        if missing != n_batches * len(shapes):
            raise ActstoreError(f"run {run_id}: chunk ledger incomplete after ingest")
        con.execute("DELETE FROM arrays WHERE run_id = ?", [run_id])
        con.executemany("INSERT INTO arrays VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        con.execute(
            "UPDATE runs SET status = 'complete', completed_at = now(), "
            "wall_s = coalesce(wall_s, 0) + ? WHERE run_id = ?",
            [wall_s, run_id],
        )
