"""The CLI: output formats, one-line errors with exit codes, no torch for read-only commands."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest
from cli_process import run_cli, snapshot
from click.testing import CliRunner

from actstore.app.cli import main


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "jsonl"])
def test_sql_formats(ioi_store, fmt):
    res = CliRunner().invoke(
        main,
        [
            "sql",
            str(ioi_store),
            "select run_id, count(*) as n from prompts group by 1",
            "--format",
            fmt,
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    out = res.output
    if fmt == "table":
        assert out.splitlines()[0].split() == ["run_id", "n"] and out.splitlines()[2].split() == [
            "1",
            "20",
        ]
    elif fmt == "csv":
        assert out.strip().splitlines() == ["run_id,n", "1,20"]
    elif fmt == "json":
        assert json.loads(out) == [{"run_id": 1, "n": 20}]
    else:
        assert [json.loads(line) for line in out.strip().splitlines()] == [{"run_id": 1, "n": 20}]


def test_info_lists_runs_with_compression(ioi_store):
    res = CliRunner().invoke(main, ["info", str(ioi_store), "--format", "json"])
    rows = json.loads(res.output)
    assert rows[0]["run_id"] == 1 and rows[0]["status"] == "complete"
    assert rows[0]["stored_bytes"] > 0 and rows[0]["ratio"] > 1.0


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json", "jsonl"])
def test_export_round_trips_through_polars(ioi_store, tmp_path, fmt):
    out = tmp_path / f"prompts.{fmt}"
    res = CliRunner().invoke(main, ["export", str(ioi_store), "prompts", "--format", fmt,
                                    "-o", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    reader = {"csv": pl.read_csv, "parquet": pl.read_parquet, "json": pl.read_json,
              "jsonl": pl.read_ndjson}[fmt]  # fmt: skip
    df = reader(out)
    assert df.height == 20
    assert df["clean_text"].to_list()[:3] == [
        r["clean_text"] for r in json.loads(
            CliRunner().invoke(main, ["sql", str(ioi_store), "select clean_text from prompts "
                                      "order by prompt_idx limit 3", "--format", "json"]).output
        )
    ]  # fmt: skip


def test_read_only_commands_do_not_import_torch(ioi_store):
    """`--help`, `info`, `sql` and `export`, and every module of actstore.core, import neither
    torch nor transformers nor TransformerLens (import-linter checks the imports it can see;
    this checks what a real run imports)."""
    code = (
        "import pkgutil, sys, importlib; from click.testing import CliRunner; "
        "from actstore.app.cli import main; import actstore.core as core; "
        "[importlib.import_module(m.name) "
        "for m in pkgutil.iter_modules(core.__path__, 'actstore.core.')]; "
        "ok = [CliRunner().invoke(main, args).exit_code for args in ("
        f"['--help'], ['info', {str(ioi_store)!r}], ['sql', {str(ioi_store)!r}, 'select 1'], "
        f"['export', {str(ioi_store)!r}, 'runs', '-o', '-'])]; "
        "print(ok, sorted({'torch', 'transformers', 'transformer_lens'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[0, 0, 0, 0] []", out.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["sql", "{s}", "delete from prompts"], 2, "read-only: DELETE statements are refused"),
        (["sql", "{s}", "selec 1"], 2, "SQL error: Parser Error"),
        (["export", "{s}", "prompts", "-o", "/nonexistent/dir/x.csv"], 1, "cannot write"),
        (["export", "{s}", "nope"], 2, "no table or view 'nope'"),
        (["ingest", "{s}", "--model", "toy-random", "--task", "nope"], 2, "unknown task 'nope'"),
        (["ingest", "{s}", "--model", "toy-nope", "--task", "ioi"], 2, "unknown built-in model"),
        (["ingest", "{s}", "--model", "toy-random", "--task", "ioi", "--hooks", "foo"], 2,
         "unknown hook 'foo'"),
        (["ingest", "{s}", "--model", "toy-random", "--task", "ioi", "--n", "0"], 2,
         "need at least one prompt"),
        (["ingest", "{s}", "--model", "no-such-model-xyz", "--task", "ioi"], 1,
         "model 'no-such-model-xyz' is not built-in or a directory, the Hugging Face hub is"),
        (["sql", "{s}", "insert into runs (run_id) values (9)"], 2,
         "INSERT statements are refused"),
        (["sql", "{s}", "select * from nope"], 2, "SQL error: Catalog Error"),
        (["verify", "{s}", "--run", "7"], 2, "run 7 is not in"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_with_exit_code_and_store_unchanged(ioi_store, args, code, message):
    before = snapshot(ioi_store)
    res = run_cli(*[a.format(s=ioi_store) for a in args])
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(ioi_store) == before


def assert_one_line(res: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "verify", "ingest"])
def test_not_a_store(tmp_path, command):
    (tmp_path / "notes.txt").write_text("not a store")
    before = snapshot(tmp_path)
    args = ["--model", "toy-random", "--task", "ioi"] if command == "ingest" else []
    res = run_cli(command, str(tmp_path), *args)
    code = 2 if command == "ingest" else 1
    assert_one_line(res, code, "is not an actstore store" if code == 1 else "is not empty")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "ingest"])
def test_catalog_from_a_newer_version_is_refused_unchanged(ioi_store, tmp_path, command):
    import shutil

    import duckdb

    copy = tmp_path / "copy"
    shutil.copytree(ioi_store, copy)
    con = duckdb.connect(str(copy / "catalog.duckdb"))
    con.execute("update meta set value = '99' where key = 'schema_version'")
    con.close()
    before = snapshot(copy)
    args = ["--model", "toy-random", "--task", "ioi", "--n", "4"] if command == "ingest" else []
    res = run_cli(command, str(copy), *args)
    assert_one_line(res, 1, "catalog schema version 99 is newer than this actstore supports")
    assert snapshot(copy) == before


INGEST_4 = ["--model", "toy-random", "--task", "ioi", "--n", "4", "--hooks", "resid_pre"]


def test_ingest_prints_run_id_on_stdout_and_the_summary_on_stderr(tmp_path, session_ingest):
    """In process (the session's model): stdout is the run id alone, for scripts."""
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "s"), *INGEST_4])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "1"
    assert res.stderr.strip().splitlines()[-1] == ("run 1: ioi on toy-random, 4 prompts, complete")


@pytest.mark.slow
def test_ingest_prints_run_id_on_stdout(tmp_path):
    """A real process, model load included: nothing else reaches stdout."""
    res = run_cli("ingest", str(tmp_path / "s"), *INGEST_4)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"
