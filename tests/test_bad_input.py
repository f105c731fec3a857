"""The bad-input matrix (ingest side): one line, the documented exit code, the store unchanged.

The SQL, export, unknown model/task/hook, `--n 0`, not-a-store and newer-schema cases run as
real subprocesses in test_cli.py; these cases need files or a patched process, so they run the
CLI in-process with click's runner. The model is loaded once per session (ingest.runner's
`load_model` is patched to hand back the session's toy-random) to keep the file fast.
"""

from __future__ import annotations

import csv
import errno
import json
import subprocess
import sys

import duckdb
import pytest
from click.testing import CliRunner
from test_cli import snapshot

import actstore
from actstore.app.cli import main
from actstore.core import arrays as zarrays
from actstore.core.verify import failures


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
def store(ioi_copy):
    """A private copy of the session's IOI store (run 1, toy-random) to break things in."""
    return ioi_copy


@pytest.fixture(autouse=True)
def session_model(session_ingest):
    """Every ingest here loads the session's toy-random."""


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


# ---- refused before the store is touched ------------------------------------------------------

TOY = ("--model", "toy-random", "--task", "ioi", "--n", "4")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--device", "bogus"), 2, "--device bogus: not a device; choose cpu, cuda"),
        (("--seed", str(2**31)), 2, "--seed 2147483648: choose a seed from 0 to 2147483647"),
        (("--seed", "-1"), 2, "--seed -1: choose a seed from 0"),
        (("--n", str(2**31)), 2, "--n 2147483648: need at least one prompt (and at most"),
        (("--dataset", "pairs.json"), 2, "give --task or --dataset, not both"),
        (("--bogus",), 2, "No such option '--bogus'"),
        (("--corruption", "nope"), 2, "Invalid value for '--corruption'"),
        (("--n", "ten"), 2, "Invalid value for '--n': 'ten' is not a valid integer"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line_and_leave_the_store_as_it_was(store, args, code, message):
    before = snapshot(store)
    res = invoke("ingest", store, *TOY, *args)
    assert_refused(res, code, message)
    assert snapshot(store) == before


def test_cheap_checks_refuse_before_torch_is_imported(store, tmp_path):
    """A mistyped flag costs an import of the CLI, not of torch and the model."""
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    cases = [
        [*TOY, "--device", "bogus"],
        [*TOY, "--seed", str(2**40)],
        [*TOY, "--dataset", str(nested)],
        ["--model", "toy-random", "--dataset", str(nested)],
        ["--model", "toy-random", "--task", "nope"],
        ["--model", "toy-nope", "--task", "ioi"],
        ["--model", "toy-random", "--task", "ioi", "--bogus"],
        [*TOY, "--hooks", "foo"],
        [*TOY, "--hooks", "z,resid_pre/0"],
        [*TOY, "--hooks", " , "],
    ]
    code = (
        "import json, sys, time\n"
        "from click.testing import CliRunner\n"
        "from actstore.app.cli import main\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    t = time.perf_counter()\n"
        "    r = CliRunner().invoke(main, ['ingest', sys.argv[2], *args])\n"
        "    out.append([r.exit_code, time.perf_counter() - t, 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cases), str(store)],
                         capture_output=True, text=True)  # fmt: skip
    results = json.loads(res.stdout)
    assert [r[0] for r in results] == [2] * len(cases), (results, res.stderr)
    assert not any(r[2] for r in results), "torch was imported before refusing"


def test_the_hook_check_before_the_model_accepts_every_hook_a_model_has(toy_random):
    """The check made without the model refuses only words no model has: it passes every
    TransformerLens hook name of the model and every word --hooks documents."""
    from ingest.layout import KEYWORDS, check_hooks

    for name in sorted(toy_random.hook_names()):
        check_hooks(name)
    check_hooks(",".join([*KEYWORDS, "resid_pre/3", "z", "mlp_post", "blocks.0.attn.hook_q"]))
    check_hooks(None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((*TOY, "--seed", "-1"), "--seed -1: choose a seed from 0"),  # before the model loads
        (("--model", "toy-random", "--task", "bad", "--n", "4"), "pair 1: clean and corrupted"),
        (("--model", "toy-random", "--task", "bad", "--n", "4", "--shard", "0/2"), "pair 1: "),
    ],
)  # fmt: skip
def test_a_refused_ingest_into_a_new_path_leaves_no_directory(tmp_path, monkeypatch, args,
                                                              message):  # fmt: skip
    """The store (and its missing parents) is made by the ingest's first write, after the
    checks: refused on its flags, or on its prompts after the model loaded, nothing is left."""
    from ingest import tasks

    monkeypatch.setitem(tasks.TASKS, "bad", BadPairs("length"))
    res = invoke("ingest", tmp_path / "parent" / "store", *args)
    assert_refused(res, 2, message)
    assert list(tmp_path.iterdir()) == []
    res = invoke("merge", tmp_path / "parent" / "store")
    assert_refused(res, 2, "no shard manifests under")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["ingest", "demo"])
def test_a_store_path_that_is_a_file_is_refused(tmp_path, command):
    path = tmp_path / "afile"
    path.write_text("not a store")
    args = ("ingest", path, *TOY) if command == "ingest" else ("demo", path)
    res = invoke(*args)
    assert_refused(res, 2, f"{path} is a file")
    assert path.read_text() == "not a store"


def test_save_basis_into_a_missing_directory_is_refused_before_computing(store, tmp_path):
    before = snapshot(store)
    res = invoke("subspace", store, "--run", "1", "--hook", "blocks.1.hook_resid_pre",
                 "--basis", "das", "--save-basis", tmp_path / "nope" / "v.npy")  # fmt: skip
    assert_refused(res, 2, f"--save-basis {tmp_path / 'nope' / 'v.npy'}: directory")
    assert snapshot(store) == before


def test_the_old_save_direction_spelling_points_to_save_basis(store, tmp_path):
    before = snapshot(store)
    res = invoke("subspace", store, "--run", "1", "--hook", "blocks.1.hook_resid_pre",
                 "--basis", "das", "--save-direction", tmp_path / "v.npy")  # fmt: skip
    assert_refused(res, 2, "--save-direction is now --save-basis FILE.npy")
    assert snapshot(store) == before and not (tmp_path / "v.npy").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("json-deep", "JSON nested too deeply to read"),
        ("json-long-int", "unreadable JSON value: Exceeds the limit"),
        ("csv-long-int", "row 2 (line 3): correct_idx '1111"),
        ("json-long-prompt", "differ in token length"),
    ],
)  # fmt: skip
def test_hostile_dataset_files_are_one_line(store, tmp_path, toy_random, case, message):
    pairs = ioi_rows(toy_random)
    if case == "json-deep":
        path = tmp_path / "deep.json"
        path.write_text('{"prompts": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "json-long-int":
        path = tmp_path / "long.json"
        path.write_text('{"prompts": [' + "7" * 5000 + "]}")
    elif case == "csv-long-int":
        rows = csv_rows(toy_random, pairs)
        rows[1] = (rows[1][0], rows[1][1], "1" * 5000, rows[1][3])
        path = write_csv(tmp_path / "long.csv", rows)
    else:
        prompts = json_prompts(pairs)
        prompts[1]["clean"] = " ".join(["Mary"] * 5000)  # 10k+ characters
        path = tmp_path / "long.json"
        path.write_text(json.dumps({"prompts": prompts}))
    before = snapshot(store)
    res = invoke("ingest", store, "--model", "toy-random", "--dataset", path)
    assert_refused(res, 2, message)
    assert len(res.stderr) < 500, len(res.stderr)  # a 10k-character prompt is not echoed whole
    assert snapshot(store) == before


def test_a_size_that_cannot_fit_is_refused_before_generating_prompts(store):
    before = snapshot(store)
    res = invoke("ingest", store, "--model", "toy-random", "--task", "ioi", "--n", "100000000")
    assert_refused(res, 1, "--n 100000000: the activations need about")
    assert "ingest fewer prompts, fewer --hooks, or --dtype float16" in res.stderr
    assert snapshot(store) == before


def test_the_chunk_size_is_clamped_to_the_prompts_ingested(store):
    res = invoke("ingest", store, "--model", "toy-random", "--task", "ioi", "--n", "8",
                 "--batch-size", "1000000", "--hooks", "z")  # fmt: skip
    assert res.exit_code == 0, res.output
    s = actstore.open(store)
    assert s.run(2)["batch_size"] == 8
    chunks = [json.loads(c) for c in s.sql("select chunks from arrays where run_id = 2")["chunks"]]
    assert chunks and all(c[0] == 8 for c in chunks), chunks


def test_disk_full_with_the_catalog_full_too_says_the_run_stays_ingesting(store, monkeypatch):
    """The status the message names is the one recorded: when not even the rollback can be
    written, the run is left ingesting (resumable), and the message says so."""
    from actstore.core.catalog import Catalog

    full = {"disk": False}

    def fsync(path):
        if fsync.calls >= CHUNKS_PER_BATCH + 5:  # in the second batch
            full["disk"] = True
            raise OSError(errno.ENOSPC, "simulated: ENOSPC", str(path))
        fsync.calls += 1
        REAL_FSYNC(path)

    fsync.calls = 0
    real_write = Catalog.write

    def write(self):
        if full["disk"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self)

    monkeypatch.setattr(zarrays, "fsync_path", fsync)
    monkeypatch.setattr(Catalog, "write", write)
    # each batch recorded on its own (as a model slower than the toy's is): the first batch is
    # in the catalog before the disk fills in the second
    monkeypatch.setattr("ingest.background.RECORD_EVERY_S", 0.0)
    res = invoke("ingest", store, *INGEST_2)
    assert_refused(res, 1, "disk full while writing run 2; the catalog could not be written "
                   "either, so the run stays ingesting with its 1 stored batches")  # fmt: skip
    s = actstore.open(store)
    assert s.run(2, complete=False)["status"] == "ingesting"
    monkeypatch.setattr(Catalog, "write", real_write)
    monkeypatch.setattr(zarrays, "fsync_path", REAL_FSYNC)
    res = invoke("ingest", store, *INGEST_2)
    assert res.exit_code == 0 and res.stdout.strip() == "2", res.output
    assert failures(s.verify()).is_empty()


@pytest.mark.parametrize(("option", "value"), [("corruption", "nope"), ("dtype", "float64")])
def test_ingest_options_take_one_vocabulary(store, option, value):
    """--corruption and --dtype take the values of actstore.core.choices: the CLI offers them
    and ingest() from Python refuses anything else naming the option, the store untouched."""
    from actstore.core import choices
    from actstore.core.errors import UsageError

    vocabulary = {"corruption": choices.CORRUPTIONS, "dtype": choices.DTYPES}[option]
    res = invoke("ingest", "--help")
    assert f"[{'|'.join(vocabulary)}]" in " ".join(res.stdout.split()), res.stdout
    before = snapshot(store)
    with pytest.raises(
        UsageError, match=rf"^--{option} {value}: choose one of {', '.join(vocabulary)}$"
    ):
        actstore.open(store).ingest(model="toy-random", task="ioi", n=4, **{option: value})
    assert snapshot(store) == before
