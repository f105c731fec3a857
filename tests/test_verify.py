"""`actstore verify`: damaged, missing and unrecorded pieces named by run, hook, chunk and prompts;
`--repair` rewrites exactly the damaged chunks, bit for bit."""

from __future__ import annotations

import io

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner
from test_cli import snapshot

import actstore
from actstore.app.cli import main
from actstore.core import arrays as zarrays
from actstore.core.location import as_root

HOOK = "blocks.1.attn.hook_z"
FINAL = "blocks.3.hook_resid_post"  # the toy's final residual, stored by every run


@pytest.fixture
def store(ioi_copy):
    return ioi_copy


@pytest.fixture(autouse=True)
def session_model(monkeypatch, toy_random):
    import ingest.repair

    monkeypatch.setattr(ingest.repair, "load_model", lambda spec, device=None: toy_random)


def chunk_path(store, side: str, hook: str, idx: int):
    ndim = actstore.open(store).array(1, side, hook).ndim
    name = zarrays.array_name(1, side, hook)
    return as_root(store).local / zarrays.chunk_key(name, idx, ndim)


def flip_byte(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def verify_cli(store, *extra: str):
    res = CliRunner().invoke(main, ["verify", str(store), "--format", "csv", *extra])
    rows = pl.read_csv(io.StringIO(res.stdout)) if res.stdout.strip() else pl.DataFrame()
    return res, rows


def test_clean_store_verifies(store):
    res, rows = verify_cli(store)
    assert res.exit_code == 0 and rows.is_empty()
    n_arrays = actstore.open(store).sql("select count(*) from arrays").item()
    assert res.stderr.strip() == f"{store}: {3 * n_arrays} chunks verified, no damage"


def test_one_flipped_byte_is_named_and_repair_restores_it_bit_for_bit(store):
    path = chunk_path(store, "clean", HOOK, 1)
    original = actstore.open(store).read(1, "clean", HOOK)
    good_bytes = path.read_bytes()
    flip_byte(path)
    res, rows = verify_cli(store)
    assert res.exit_code == 1
    assert rows.select("run_id", "side", "hook", "chunk_idx", "prompt_start", "prompt_stop",
                       "problem").rows() == [(1, "clean", HOOK, 1, 8, 16, "damaged")]  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: {store}: 1 damaged or missing piece(s) in run(s) 1; "
                     "try actstore verify --repair"]  # fmt: skip
    before = snapshot(store)
    res, _ = verify_cli(store, "--repair")
    assert res.exit_code == 0, res.output
    assert "repaired" in res.stdout and "no damage" in res.stderr
    assert path.read_bytes() == good_bytes  # the same bytes on disk, not just equal values
    changed = {k for k in snapshot(store) if snapshot(store)[k] != before.get(k)}
    assert changed <= {str(path.relative_to(store)), "catalog.duckdb"}, changed
    assert (actstore.open(store).read(1, "clean", HOOK) == original).all()


def test_undecodable_and_missing_chunks_are_reported_not_crashes(store):
    chunk_path(store, "corrupted", FINAL, 2).write_bytes(b"\x00" * 40)
    chunk_path(store, "clean", "tokens", 0).unlink()
    res, rows = verify_cli(store)
    assert res.exit_code == 1 and "Traceback" not in res.output
    got = {(r["side"], r["hook"], r["chunk_idx"], r["problem"]) for r in rows.iter_rows(named=True)}
    assert got == {("corrupted", FINAL, 2, "damaged"), ("clean", "tokens", 0, "missing")}
    assert "does not decode" in rows.filter(pl.col("hook") == FINAL)["detail"].item()
    res, _ = verify_cli(store, "--repair")
    assert res.exit_code == 0, res.output
    assert verify_cli(store)[0].exit_code == 0


def test_complete_run_missing_ledger_rows_and_prompts_is_reported(store):
    con = duckdb.connect(str(store / "catalog.duckdb"))
    con.execute(
        f"delete from chunks where hook = '{HOOK}' and side = 'corrupted' and chunk_idx = 2"
    )
    con.execute("delete from prompts where prompt_idx between 3 and 5")
    con.close()
    res, rows = verify_cli(store)
    assert res.exit_code == 1
    got = rows.select("side", "hook", "chunk_idx", "prompt_start", "prompt_stop", "problem").rows()
    assert sorted(got, key=str) == sorted(
        [("corrupted", HOOK, 2, 16, 20, "unrecorded"), (None, None, None, 3, 6, "missing-prompts")],
        key=str,
    )


def test_incomplete_run_is_noted_but_not_damage_and_run_filter(store):
    con = duckdb.connect(str(store / "catalog.duckdb"))
    con.execute("update runs set status = 'ingesting'")
    con.close()
    flip_byte(chunk_path(store, "clean", HOOK, 0))
    res, rows = verify_cli(store, "--run", "1")
    assert res.exit_code == 1
    assert set(rows["problem"]) == {"damaged", "incomplete"}
    assert "rerun its ingest command" in rows.filter(pl.col("problem") == "incomplete")["detail"][0]
    verify_cli(store, "--repair")
    res, rows = verify_cli(store)
    assert res.exit_code == 0 and rows["problem"].to_list() == ["incomplete"]
