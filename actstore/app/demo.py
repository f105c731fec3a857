"""`actstore demo`: the whole pipeline on the built-in toy model in under a minute.

Ingest each task, patch every head (logit difference, denoising), score edges with EAP-IG,
print the top heads per task by importance and the overlap of those head and edge sets
(computed in SQL over the stored effects, like every other number printed), find the smallest
EAP-IG circuit reaching 85% faithfulness, then Greater-Than under Hanna et al.'s probability
difference, write plots, and show what to try next.

Rerunning on the same directory reuses the runs and queries already there: ingest is matched on
(model, task, n, seed) and patching/attribution/circuits answer repeated questions from the
catalog.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import polars as pl

import actstore
from actstore.core.errors import UsageError
from actstore.core.output import refuse_inside_store, render_table
from actstore.core.runtime import Runtime
from actstore.core.store import CATALOG
from actstore.model.model_spec import BUILTIN_DIR
from queries.analysis import lookups, plot
from queries.analysis import overlap as ov
from queries.analysis.report import report
from queries.attribution import attribute, circuit
from queries.patching import patch

DEFAULT_TASKS = ("ioi", "colored-objects")
PATCH = {"component": "head", "metric": "logit-diff", "direction": "denoise"}
METHOD = "eap-ig"
EDGE_TOP_FRAC = 0.05
FAITHFULNESS = 0.85
GREATER_THAN = "greater-than"
GREATER_THAN_METRIC = "prob-diff"  # Hanna et al.'s metric for the task


def demo_model() -> tuple[str, str | None]:
    """`toy` when its trained weights ship, else `toy-random` and a note saying why."""
    if (BUILTIN_DIR / "toy" / "model.safetensors").exists():
        return "toy", None
    return "toy-random", (
        "note: the trained toy model's weights are not installed "
        f"({BUILTIN_DIR / 'toy' / 'model.safetensors'}); using toy-random (random weights), "
        "so the heads found are not a trained circuit"
    )


def _directory(directory: str | Path | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="actstore-demo-"))
    path = Path(directory)
    refuse_inside_store(path, "DIRECTORY")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file; give the demo a new or empty directory")
    if path.exists() and any(path.iterdir()) and not (path / "store" / CATALOG).exists():
        raise UsageError(
            f"{path} is not empty and holds no demo store; choose a new or empty directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ingest(store: Any, model: str, task: str, n: int, seed: int) -> int:
    """The run of (model, task, n, seed) already in the store, else a new ingest (the first
    one makes the store)."""
    if store.exists:
        found = store._trusted_query(
            "SELECT max(run_id) FROM runs WHERE model = ? AND task = ? AND n_prompts = ? "
            "AND seed = ? AND corruption = 'str' AND status = 'complete'",
            [model, task, n, seed],
        ).item()
        if found is not None:
            return int(found)
    row = store.ingest(model=model, task=task, n=n, seed=seed, batch_size=n,
                       runtime=Runtime(progress=False))  # fmt: skip
    return int(row["run_id"][0])


def _top_heads(store: Any, query: int, k: int) -> str:
    top = lookups.top_heads(store, query, k=k)
    return ", ".join(f"{h} {e:.3f}" for h, e in top.select("node", "importance").rows())


def demo(
    directory: str | Path | None = None,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    n: int = 32,
    top_k: int = 4,
    seeds: list[int] | None = None,
    model: str | None = None,
    greater_than: bool = True,
    out: IO[str] | None = None,
) -> pl.DataFrame:
    """Run the demo; prints a summary to `out` (stdout), notes to stderr; returns the head
    overlap table. `seeds` defaults to 0, 1, … so one task given twice gets different prompts;
    `greater_than` adds the Greater-Than run scored by prob-diff."""
    out = out or sys.stdout
    started = time.monotonic()

    def say(text: str = "") -> None:
        out.write(text + "\n")

    tasks = list(tasks)
    if len(tasks) < 2:
        raise UsageError("the demo compares tasks: give at least two, e.g. --tasks ioi,ioi")
    seeds = list(range(len(tasks))) if seeds is None else seeds
    if model is None:
        model, why = demo_model()
        if why:
            print(why, file=sys.stderr)
    root = _directory(directory)
    store = actstore.open(root / "store", create=True)
    plot_dir = root / "plots"
    plot_dir.mkdir(exist_ok=True)
    written: list[Path] = []

    say(f"actstore demo: model {model}, tasks {', '.join(tasks)}, {n} prompt pairs each")
    runs = [_ingest(store, model, t, n, s) for t, s in zip(tasks, seeds, strict=True)]
    for run, task in zip(runs, tasks, strict=True):
        say(f"  run {run}: {task}")
    head_queries = [int(patch(store, run, **PATCH)["query_id"][0]) for run in runs]
    score_sets = [int(attribute(store, run, METHOD)["score_id"][0]) for run in runs]

    say()
    say(f"top {top_k} heads per task (head patching, {PATCH['metric']}, denoising; importance):")
    for run, query in zip(runs, head_queries, strict=True):
        say(f"  run {run} {store.run(run)['task']} (query {query}): "
            f"{_top_heads(store, query, top_k)}")  # fmt: skip
        written.append(plot_dir / f"effects_run{run}.png")
        plot.plot_effects(store, query, written[-1])

    heads = ov.Selection(top_k=top_k)
    head_overlap = _overlap(store, runs, heads, head_queries, plot_dir / "overlap_heads.png", say)
    edges = ov.Selection(by="edge", top_frac=EDGE_TOP_FRAC)
    _overlap(store, runs, edges, score_sets, plot_dir / "overlap_edges.png", say)
    written += [plot_dir / "overlap_heads.png", plot_dir / "overlap_edges.png"]

    say()
    found = circuit(store, score_sets[0], faithfulness=FAITHFULNESS).row(0, named=True)
    say(f"smallest {METHOD} circuit of run {runs[0]} ({tasks[0]}) reaching faithfulness "
        f"{FAITHFULNESS}: {_circuit_line(store, found)}")  # fmt: skip
    written.append(plot_dir / f"faithfulness_run{runs[0]}.png")
    plot.plot_faithfulness(store, score_sets[0], written[-1])

    if greater_than:
        written += _greater_than(store, model, n, top_k, plot_dir, say)

    page = root / "report.html"
    report(store, page, top_k=top_k, edge_top_frac=EDGE_TOP_FRAC)
    location = shlex.quote(str(store.path))
    say()
    say(f"store:  {store.path}")
    for path in written:
        say(f"plot:   {path}")
    say(f"report: {page}")
    say()
    say("try next:")
    say(f'  actstore sql {location} "select run_id, task, model, n_prompts from runs"')
    say(f'  actstore sql {location} "select task, metric, node, importance, rank from top_heads '
        f'where rank <= {top_k} order by query_id, rank"')  # fmt: skip
    say(f'  actstore sql {location} "select a.task, b.task, count(*) as shared_heads '
        f"from top_heads a join top_heads b using (node) where a.rank <= {top_k} and "
        f"b.rank <= {top_k} and a.query_id < b.query_id and a.metric = b.metric "
        f'group by all"')  # fmt: skip
    say(f"({time.monotonic() - started:.0f} s)")
    return head_overlap


def _greater_than(store: Any, model: str, n: int, top_k: int, plot_dir: Path, say) -> list[Path]:
    """Greater-Than scored by prob-diff: head patching, an EAP-IG circuit, its curve."""
    run = _ingest(store, model, GREATER_THAN, n, 0)
    metric = GREATER_THAN_METRIC
    query = int(patch(store, run, component="head", metric=metric)["query_id"][0])
    scores = int(attribute(store, run, METHOD, metric=metric)["score_id"][0])
    found = circuit(store, scores, faithfulness=FAITHFULNESS).row(0, named=True)
    say()
    say(f"greater-than (run {run}) by {metric}, Σ p(years after the start year) − "
        "Σ p(years up to it):")  # fmt: skip
    say(f"  clean {found['clean_metric']:.3f}, corrupted {found['corrupted_metric']:.3f} "
        f"(mean over {n} prompts)")  # fmt: skip
    say(f"  top {top_k} heads (query {query}, denoising; importance): "
        f"{_top_heads(store, query, top_k)}")  # fmt: skip
    say(f"  smallest {METHOD} circuit reaching faithfulness {FAITHFULNESS}: "
        f"{_circuit_line(store, found)}")  # fmt: skip
    written = [plot_dir / f"effects_run{run}.png", plot_dir / f"faithfulness_run{run}.png"]
    plot.plot_effects(store, query, written[0])
    plot.plot_faithfulness(store, scores, written[1])
    return written


def _overlap(
    store: Any, runs: list[int], selection: ov.Selection, sources: list[int], path: Path, say
) -> pl.DataFrame:
    """Plot the sets' overlap and print its pairs (the rows the plot drew)."""
    df = plot.plot_overlap(store, runs, selection, path, queries=sources)
    say()
    say(f"overlap of the {selection.describe()}, {ov.compared(df)}:")
    say(_pairs(df).rstrip("\n"))
    return df


def _circuit_line(store: Any, row: dict) -> str:
    total = store._trusted_query(
        "SELECT count(*) FROM edge_scores WHERE score_id = ?", [row["score_id"]]
    ).item()
    return (
        f"{row['n_edges']} of {total} edges, faithfulness {row['faithfulness']:.3f} "
        f"(circuit {row['circuit_id']}, score set {row['score_id']})"
    )


def _pairs(df: pl.DataFrame) -> str:
    """Each unordered pair once, as an aligned table."""
    pairs = df.filter(pl.col("run_a") < pl.col("run_b")).select(
        "run_a", "run_b", "task_a", "task_b", "n_a", "n_b", "intersection", "iou",
        "universe", "frac_of_a", "frac_of_b", "p_value",
    )  # fmt: skip
    return render_table(pairs)
