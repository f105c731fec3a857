"""The bad-input matrix (ingest side): one line, the documented exit code, the store unchanged.

The SQL, export, unknown model/task/hook, `--n 0`, not-a-store and newer-schema cases run as
real subprocesses in test_cli.py; these cases need files or a patched process, so they run the
CLI in-process with click's runner. The model is loaded once per session (ingest.runner's
`load_model` is patched to hand back the session's toy-random) to keep the file fast.
"""

from __future__ import annotations

import csv
import errno
import importlib.util
import json
import shutil

import duckdb
import pytest
from click.testing import CliRunner
from test_cli import snapshot

import actstore
from actstore import arrays as zarrays
from actstore.cli import main
from actstore.verify import failures

HAVE_DATASETS = importlib.util.find_spec("ingest.datasets") is not None
needs_datasets = pytest.mark.skipif(
    not HAVE_DATASETS, reason="ingest/datasets.py (issue 3, branch tasks) has not landed yet"
)


def catalog_rows(path) -> dict[str, list]:
    """Every catalog table's rows: what 'unchanged' means for a file DuckDB rewrites."""
    con = duckdb.connect(str(path / "catalog.duckdb"), read_only=True)
    try:
        tables = [r[0] for r in con.execute("select table_name from information_schema.tables")
                  .fetchall()]  # fmt: skip
        return {
            t: sorted(map(repr, con.execute(f'select * from "{t}"').fetchall())) for t in tables
        }
    finally:
        con.close()


@pytest.fixture
def store(ioi_store, tmp_path):
    """A private copy of the session's IOI store (run 1, toy-random) to break things in."""
    copy = tmp_path / "store"
    shutil.copytree(ioi_store, copy)
    return copy


@pytest.fixture(autouse=True)
def session_model(monkeypatch, toy_random):
    import ingest.runner

    real = ingest.runner.load_model

    def load(spec, device=None):
        return toy_random if spec == "toy-random" else real(spec, device)

    monkeypatch.setattr(ingest.runner, "load_model", load)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(res, code: int, message: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_store_made_with_another_model_is_refused(store, tmp_path, toy_random):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "other-model"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_inner=64,
                        vocab_size=len(toy_random.tokenizer), n_positions=64)  # fmt: skip
    hf = GPT2LMHeadModel(config)
    hf.save_pretrained(other)
    toy_random.tokenizer.save_pretrained(other)
    before = snapshot(store)
    res = invoke("ingest", store, "--model", other, "--task", "ioi", "--n", "4")
    assert_refused(res, 2, "holds activations of model 'toy-random'")
    assert snapshot(store) == before


class BadPairs:
    """A task whose second pair breaks one tokenizer rule."""

    name = "bad"
    description = "test task"

    def __init__(self, breaks: str):
        self.breaks = breaks

    def generate(self, n, seed, model):
        from dataclasses import replace

        from ingest.tasks.ioi import IOI

        pairs = IOI().generate(n, seed, model)
        p = pairs[1]
        if self.breaks == "length":
            pairs[1] = replace(p, corrupted=p.corrupted + " " + p.answer)
        else:
            pairs[1] = replace(p, answer=p.answer + " " + p.wrong_answer)
        return pairs


@pytest.mark.parametrize(
    ("breaks", "message"),
    [("length", "pair 1: clean and corrupted differ in token length"),
     ("answer", "pair 1: answer")],
)  # fmt: skip
def test_task_pairs_that_break_tokenizer_rules_are_refused(store, monkeypatch, breaks, message):
    from ingest import tasks

    monkeypatch.setitem(tasks.TASKS, "bad", BadPairs(breaks))
    before = snapshot(store)
    res = invoke("ingest", store, "--model", "toy-random", "--task", "bad", "--n", "4")
    assert_refused(res, 2, message)
    assert snapshot(store) == before


def ioi_rows(model, n=3):
    from ingest.tasks.ioi import IOI

    return IOI().generate(n, 0, model)


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clean", "corrupted", "correct_idx", "incorrect_idx"])
        writer.writerows(rows)
    return path


def csv_rows(model, pairs):
    return [(p.clean, p.corrupted, model.token_ids(p.answer)[0], model.token_ids(p.wrong_answer)[0])
            for p in pairs]  # fmt: skip


def json_prompts(pairs):
    return [{"clean": p.clean, "corrupt": p.corrupted, "answers": [p.answer],
             "wrong_answers": [p.wrong_answer]} for p in pairs]  # fmt: skip


@needs_datasets
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("csv-length", "differ in token length"),
        ("json-length", "differ in token length"),
        ("json-multitoken", "must be exactly 1"),
        ("csv-empty", "no prompt pairs"),
        ("json-empty", "no prompt pairs"),
        ("csv-malformed", "row 2"),
        ("json-malformed", "corrupt"),
    ],
)
def test_bad_dataset_files_are_refused(store, tmp_path, toy_random, case, message):
    pairs = ioi_rows(toy_random)
    rows, prompts = csv_rows(toy_random, pairs), json_prompts(pairs)
    if case == "csv-length":
        rows[1] = (rows[1][0], rows[1][1] + " " + pairs[1].answer, *rows[1][2:])
    elif case == "json-length":
        prompts[1]["corrupt"] += " " + pairs[1].answer
    elif case == "json-multitoken":
        prompts[1]["answers"] = [pairs[1].answer + " " + pairs[1].wrong_answer]
    elif case in ("csv-empty", "json-empty"):
        rows, prompts = [], []
    elif case == "csv-malformed":
        rows[1] = rows[1][:2]
    elif case == "json-malformed":
        del prompts[1]["corrupt"]
    if case.startswith("csv"):
        path = write_csv(tmp_path / "pairs.csv", rows)
    else:
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps({"prompts": prompts}))
    before = snapshot(store)
    res = invoke("ingest", store, "--model", "toy-random", "--dataset", path)
    assert_refused(res, 2, message)
    assert "pairs." in res.stderr  # the message names the file
    assert snapshot(store) == before


REAL_FSYNC = zarrays.fsync_path


def fail_fsync_after(monkeypatch, calls: int, err: int):
    """Make the `calls`+1-th chunk fsync fail as a full (or broken) disk would."""
    real = REAL_FSYNC
    count = {"n": 0}

    def fsync(path):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(err, f"simulated: {errno.errorcode[err]}", str(path))
        real(path)

    monkeypatch.setattr(zarrays, "fsync_path", fsync)


INGEST_2 = ("--model", "toy-random", "--task", "ioi", "--n", "12", "--batch-size", "4",
            "--hooks", "z", "--seed", "3")  # fmt: skip
CHUNKS_PER_BATCH = 2 * (2 + 4)  # sides x (tokens, logits, z of 4 layers)


def test_disk_full_mid_way_rolls_back_a_new_run(store, monkeypatch):
    files, rows = snapshot(store), catalog_rows(store)
    fail_fsync_after(monkeypatch, CHUNKS_PER_BATCH + 5, errno.ENOSPC)  # in the second batch
    res = invoke("ingest", store, *INGEST_2)
    assert_refused(res, 1, "disk full while writing run 2; the run was rolled back")
    # arrays byte for byte; the catalog file is rewritten by DuckDB, so compare its rows
    assert {k: v for k, v in snapshot(store).items() if not k.startswith("catalog")} == {
        k: v for k, v in files.items() if not k.startswith("catalog")
    }
    assert catalog_rows(store) == rows
    assert failures(actstore.open(store).verify()).is_empty()


def test_disk_full_while_resuming_keeps_earlier_batches(store, monkeypatch):
    fail_fsync_after(monkeypatch, CHUNKS_PER_BATCH, errno.EIO)  # fails in batch 2 of 3
    res = invoke("ingest", store, *INGEST_2)
    assert_refused(res, 1, "while writing run 2; it keeps 1 stored batches and is marked failed")
    fail_fsync_after(monkeypatch, 0, errno.ENOSPC)  # the resume finds the disk full at once
    res = invoke("ingest", store, *INGEST_2)
    assert_refused(res, 1, "disk full while writing run 2; it keeps 1 stored batches")
    s = actstore.open(store)
    assert s.run(2, complete=False)["status"] == "failed"
    assert s.sql("select count(*) from prompts where run_id = 2").item() == 4
    monkeypatch.setattr(zarrays, "fsync_path", REAL_FSYNC)
    res = invoke("ingest", store, *INGEST_2)
    assert res.exit_code == 0 and res.stdout.strip() == "2", res.output
    assert s.run(2)["status"] == "complete"
    assert s.sql("select count(*) from prompts where run_id = 2").item() == 12
    assert failures(s.verify()).is_empty()
