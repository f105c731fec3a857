"""`actstore demo`: the whole pipeline on the built-in toy model in about a minute.

Ingest each task, patch every head (logit difference, denoising), score edges with EAP-IG,
print the top heads per task and the overlap of those head sets (computed in SQL over the
stored effects, like every other number printed), write plots, and show what to try next.

Rerunning on the same directory reuses the runs and queries already there: ingest is matched on
(model, task, n, seed) and patching/attribution answer repeated questions from the catalog.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import polars as pl

import actstore
from actstore.errors import UsageError
from actstore.models import BUILTIN_DIR
from actstore.output import render_table
from actstore.store import CATALOG
from queries import overlap as ov
from queries import plots, views
from queries.report import report

DEFAULT_TASKS = ("ioi", "colored-objects")
PATCH = {"component": "head", "metric": "logit-diff", "direction": "denoise"}
METHOD = "eap-ig"
EDGE_TOP_FRAC = 0.05


def demo_model() -> tuple[str, str | None]:
    """`toy` when its trained weights ship, else `toy-random` and a note saying why."""
    if (BUILTIN_DIR / "toy" / "model.safetensors").exists():
        return "toy", None
    return "toy-random", (
        "note: the trained toy model's weights are not installed "
        f"({BUILTIN_DIR / 'toy' / 'model.safetensors'}); using toy-random (random weights), "
        "so the heads found are not a trained circuit"
    )


def _analysis(name: str) -> Callable[..., Any] | None:
    """queries.patching.patch / queries.attribution.attribute, or None where not built in."""
    module, function = {"patch": ("patching", "patch"), "attribute": ("attribution", "attribute")}[
        name
    ]
    try:
        imported = __import__(f"queries.{module}", fromlist=[function])
    except ImportError:
        return None
    return getattr(imported, function, None)


def _directory(directory: str | Path | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="actstore-demo-"))
    path = Path(directory)
    if path.exists() and any(path.iterdir()) and not (path / "store" / CATALOG).exists():
        raise UsageError(
            f"{path} is not empty and holds no demo store; choose a new or empty directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ingest(store: Any, model: str, task: str, n: int, seed: int) -> int:
    """The run of (model, task, n, seed) already in the store, else a new ingest."""
    found = store.query(
        "SELECT max(run_id) FROM runs WHERE model = ? AND task = ? AND n_prompts = ? "
        "AND seed = ? AND corruption = 'str' AND status = 'complete'",
        [model, task, n, seed],
    ).item()
    if found is not None:
        return int(found)
    row = store.ingest(model=model, task=task, n=n, seed=seed, batch_size=n, progress=False)
    return int(row["run_id"][0])


def demo(
    directory: str | Path | None = None,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    n: int = 32,
    top_k: int = 4,
    seeds: list[int] | None = None,
    model: str | None = None,
    patch: Callable[..., Any] | None = None,
    attribute: Callable[..., Any] | None = None,
    out: IO[str] | None = None,
) -> pl.DataFrame:
    """Run the demo; prints a summary to `out` (stdout), notes to stderr; returns the head
    overlap table. `seeds` defaults to 0, 1, … so one task given twice gets different prompts;
    `patch`/`attribute` default to queries.patching.patch / queries.attribution.attribute."""
    out = out or sys.stdout
    started = time.monotonic()

    def say(text: str = "") -> None:
        out.write(text + "\n")

    def note(text: str) -> None:
        print(text, file=sys.stderr)

    tasks = list(tasks)
    if len(tasks) < 2:
        raise UsageError("the demo compares tasks: give at least two, e.g. --tasks ioi,ioi")
    seeds = list(range(len(tasks))) if seeds is None else seeds
    if model is None:
        model, why = demo_model()
        if why:
            note(why)
    root = _directory(directory)
    store = actstore.open(root / "store", create=True)
    plot_dir = root / "plots"
    plot_dir.mkdir(exist_ok=True)
    patch = patch or _analysis("patch")
    attribute = attribute or _analysis("attribute")

    say(f"actstore demo: model {model}, tasks {', '.join(tasks)}, {n} prompt pairs each")
    runs = [_ingest(store, model, t, n, s) for t, s in zip(tasks, seeds, strict=True)]
    for run, task in zip(runs, tasks, strict=True):
        say(f"  run {run}: {task}")

    written: list[Path] = []
    head_queries: list[int] = []
    if patch is None:
        note("note: head patching is not in this build (queries.patching.patch); skipped")
    else:
        for run in runs:
            patch(store, run_id=run, **PATCH)
            head_queries.append(views.latest_patch_query(store, run, **PATCH))
    score_sets: list[int] = []
    if attribute is None:
        note("note: attribution is not in this build (queries.attribution.attribute); skipped")
    else:
        for run in runs:
            attribute(store, run_id=run, method=METHOD)
            score_sets.append(views.latest_score_set(store, run, METHOD))

    head_overlap = pl.DataFrame()
    if head_queries:
        say()
        say(f"top {top_k} heads per task (head patching, logit-diff, denoising; |normalized "
            "effect|):")  # fmt: skip
        for run, query in zip(runs, head_queries, strict=True):
            top = views.top_heads(store, query, k=top_k)
            heads = ", ".join(f"{h} {e:+.3f}" for h, e in top.select("node", "normalized").rows())
            say(f"  run {run} {top['task'][0]} (query {query}): {heads}")
        sets = list(zip(runs, head_queries, strict=True))
        head_overlap = ov.overlap_of_sources(store, sets, ov.Selection(top_k=top_k))
        say()
        say(f"overlap of the top-{top_k} head sets:")
        out.write(_pairs(head_overlap))
        for run, query in zip(runs, head_queries, strict=True):
            written.append(plot_dir / f"effects_run{run}.png")
            plots.plot_effects(store, query, written[-1])
        written.append(plot_dir / "overlap_heads.png")
        plots.plot_overlap(store, runs, ov.Selection(top_k=top_k), written[-1])
    if score_sets:
        sets = list(zip(runs, score_sets, strict=True))
        selection = ov.Selection(by="edge", top_frac=EDGE_TOP_FRAC)
        edge_overlap = ov.overlap_of_sources(store, sets, selection)
        say()
        say(f"overlap of the {selection.describe()} ({METHOD} scores):")
        out.write(_pairs(edge_overlap))
        written.append(plot_dir / "overlap_edges.png")
        plots.plot_overlap(store, runs, selection, written[-1], method=METHOD)
        for run, score in sets:
            if _has_faithfulness(store, score):
                written.append(plot_dir / f"faithfulness_run{run}.png")
                plots.plot_faithfulness(store, score, written[-1])

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
    say(f'  actstore sql {location} "select task, node, normalized, rank from top_heads '
        f'where rank <= {top_k} order by task, rank"')  # fmt: skip
    say(f'  actstore sql {location} "select a.task, b.task, count(*) as shared_heads '
        f"from top_heads a join top_heads b using (node) where a.rank <= {top_k} and "
        f'b.rank <= {top_k} and a.query_id < b.query_id group by all"')  # fmt: skip
    say(f"({time.monotonic() - started:.0f} s)")
    return head_overlap


def _pairs(df: pl.DataFrame) -> str:
    """Each unordered pair once, as an aligned table."""
    pairs = df.filter(pl.col("run_a") < pl.col("run_b")).select(
        "run_a", "run_b", "task_a", "task_b", "n_a", "n_b", "intersection", "iou",
        "frac_of_a", "frac_of_b", "p_value",
    )  # fmt: skip
    return render_table(pairs)


def _has_faithfulness(store: Any, score_id: int) -> bool:
    return bool(
        store.query(
            "SELECT (SELECT count(*) FROM faithfulness_curve WHERE score_id = ?) + "
            "(SELECT count(*) FROM circuits WHERE score_id = ?)",
            [score_id, score_id],
        ).item()
    )
