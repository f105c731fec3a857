"""The `actstore` command line: a thin layer over the Python functions, one command each.

Results go to stdout, progress and messages to stderr. An expected error prints one line and
exits 1 (runtime) or 2 (usage), never a traceback. Heavy imports (torch, TransformerLens) happen
inside the commands that need a model, so `info`, `sql` and `export` start fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import click

from actstore.app.defaults import defaults
from actstore.core import choices
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.output import FILE_FORMATS, PRINT_FORMATS, check_output_path, write_rows

FORMAT = click.option(
    "--format",
    "fmt",
    type=click.Choice(PRINT_FORMATS),
    default="table",
    show_default=True,
    help="How rows are printed.",
)


# The function behind each command (the one the API binds, api.py): its signature holds the
# options' defaults, read from its source (actstore/app/defaults.py), since importing it would
# import torch. `--help` shows them; a default the command line spells otherwise is written here.
INGEST = defaults("ingest.runner", "ingest")
EXPORT = defaults("actstore.core.store", "Store.export")
PATCH = defaults("queries.patching", "patch")
PATH = defaults("queries.paths", "path")
INTERVENE = defaults("queries.paths.intervene", "intervene")
SUBSPACE = defaults("queries.subspace", "subspace")
ATTRIBUTE = defaults("queries.attribution", "attribute")
CIRCUIT = defaults("queries.attribution", "circuit")
ATTENTION = defaults("queries.attention", "attention")
HEADS = defaults("queries.attention", "head_scores")
REDUCE = defaults("queries.reduction.reduce", "reduce")
OVERLAP = defaults("actstore.app.api", "ActStore.overlap")
DEMO = defaults("actstore.app.demo", "demo")

NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
MAX_MESSAGE = 400  # characters of an error line: quoted input never floods the terminal


def one_line(message: str) -> str:
    """An error message as one line of bounded length."""
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


# One --device for every command that runs a model: CUDA when available, else CPU.
DEVICE = click.option("--device", help="cpu or cuda (default: cuda when available).")
# One --run for every command that queries a run; the Python API names it `run` too.
RUN = click.option("--run", type=int, required=True, help="Run id (see actstore info).")
# Where the prompt batches run, the same on every verb that takes them, ingest's included
# (actstore/core/runtime.py): here; a local Dask cluster of --workers N; or a running --scheduler
# (once it has N workers, with --workers N).
WORKERS = click.option(
    "--workers", type=int,
    help="Run the prompt batches as Dask tasks on N workers: a local cluster of N processes, "
    "or --scheduler's workers once it has N.",
)  # fmt: skip
SCHEDULER = click.option(
    "--scheduler", metavar="ADDRESS",
    help="A running Dask scheduler (tcp://HOST:8786) whose workers see STORE: the prompt batches "
    "run on its workers.",
)  # fmt: skip


def runtime_options(distributed: bool):
    """The options a query verb's Runtime is built from: --device, and --workers and
    --scheduler where the verb's prompt batches can run as Dask tasks."""

    def wrap(fn):
        for option in reversed([DEVICE, WORKERS, SCHEDULER] if distributed else [DEVICE]):
            fn = option(fn)
        return fn

    return wrap


def _runtime(options: dict):
    """The one Runtime of a command, taken out of its options (checked as it is made)."""
    from actstore.core.runtime import Runtime

    return Runtime(device=options.pop("device", None), workers=options.pop("workers", None),
                   scheduler=options.pop("scheduler", None))  # fmt: skip


# One --recompute for every query verb: asked again, the query is computed and recorded
# afresh, and the views and the report show the newest per setting (view current_queries).
RECOMPUTE = click.option(
    "--recompute", is_flag=True,
    help="Compute again even if asked before; the new query supersedes the old.",
)  # fmt: skip


def metric_option(python: Mapping[str, Any]):
    """One --metric for the verbs that measure one (patch, attribute, path, intervene,
    subspace), defaulting to the verb's own."""
    return click.option(
        "--metric", type=click.Choice(choices.METRICS), default=python["metric"],
        show_default=True,
    )  # fmt: skip


def direction_option(python: Mapping[str, Any]):
    """One --direction for the verbs that patch (patch, path; subspace's also points its old
    use to --basis), defaulting to the verb's own."""
    return click.option(
        "--direction", type=click.Choice(choices.DIRECTIONS), default=python["direction"],
        show_default=True,
        help="denoise: clean into the corrupted run; noise: corrupted into the clean run.",
    )  # fmt: skip


def batch_size_option(python: Mapping[str, Any]):
    """One --batch-size for the queries that take it (patch, attention, heads): prompts per
    forward, defaulting to the query's own."""
    return click.option(
        "--batch-size", type=int, default=python["batch_size"], show_default=True,
        help="Prompts per batch.",
    )  # fmt: skip


# One --top for the verbs that print ranked rows: the K most important, all of them stored.
TOP = click.option(
    "--top", type=click.IntRange(min=0),
    help="Print only the K most important rows (all are stored).",
)  # fmt: skip


def sql_limits(fn):
    """What one user SQL statement may cost (actstore.core.sandbox): `sql` and `export` take
    these."""
    options = [
        click.option("--timeout", type=float, default=choices.SQL_TIMEOUT_S,
                     show_default=True, help="Stop the statement after this many seconds."),
        click.option("--max-rows", type=int, default=choices.SQL_MAX_ROWS, show_default=True,
                     help="Refuse a result of more rows."),
        click.option("--max-mb", type=int, default=choices.SQL_MAX_MB, show_default=True,
                     help="Memory for the statement, and for its result, in MB."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


class Group(click.Group):
    """Turns expected errors into one line on stderr and the documented exit code: actstore's
    own errors (exit 1, or 2 for usage) and click's usage errors (exit 2)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            super().main(*args, standalone_mode=False, **kwargs)
        except NO_ARGS_IS_HELP as exc:  # `actstore` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "actstore"
            click.echo(f"error: {one_line(exc.format_message())} (see {command} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ActstoreError as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # an object store's errors, from wherever they surface
            from actstore.core.object_store import object_store_error

            mapped = object_store_error(exc)
            if mapped is None:
                raise
            click.echo(f"error: {one_line(str(mapped))}", err=True)
            sys.exit(mapped.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _open(path: str, create: bool = False):
    """The store at `path`; with `create`, one that its first write makes (ingest, merge)."""
    import actstore

    return actstore.open(path, create=create)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="actstore")
def main() -> None:
    """Ingest a task's activations once, query them repeatedly.

    \b
    actstore demo                                  toy model, two tasks, end to end
    actstore ingest /tmp/s --model toy --task ioi --n 64
    actstore info /tmp/s
    actstore sql /tmp/s "select task, count(*) from prompts join runs using (run_id) group by 1"
    """


@main.command()
@click.argument("store")
@click.option(
    "--model", default=INGEST["model"], show_default=True, help="Built-in name, HF dir or hub name."
)
@click.option("--task", help="Task name: ioi, colored-objects, greater-than, sva, capital-country.")
@click.option(
    "--n", type=int, help="Number of prompt pairs (default 64 for a task; all of a file)."
)
@click.option(
    "--corruption", type=click.Choice(choices.CORRUPTIONS), default=INGEST["corruption"],
    show_default=True,
)  # fmt: skip
@click.option(
    "--hooks",
    default="default",  # the preset by name; ingest's None means the same preset
    show_default=True,
    help="Comma-separated: default (= lean: z of every layer, every 2nd residual and the final "
    "one; the queries derive the rest on read), full (every layer's resid_pre, resid_mid, z "
    "and mlp_out, and the logits, all stored), resid_final, resid_pre, resid_pre/K, z, "
    "mlp_post, logits, …",
)
@click.option("--dataset", type=click.Path(), help="EAP-IG .csv or AutoCircuit .json file.")
@click.option(
    "--dtype", type=click.Choice(choices.DTYPES), default=INGEST["dtype"], show_default=True
)
@click.option(
    "--batch-size", type=int, default=INGEST["batch_size"], show_default=True,
    help="Prompts per chunk.",
)  # fmt: skip
@DEVICE
@click.option("--seed", type=int, default=INGEST["seed"], show_default=True)
@click.option(
    "--shard",
    metavar="i/N",
    help="Write only shard i (from 0) of N chunk ranges and a manifest; then actstore merge.",
)
@click.option(
    "--restart", is_flag=True, help="Discard an interrupted run with these arguments and redo it."
)
@click.option("--again", is_flag=True, help="A new run even if a complete one has these arguments.")
@WORKERS
@SCHEDULER
@click.option(
    "--arrays-url", metavar="URL", help="New store: keep its arrays at s3://bucket/prefix."
)
def ingest(store: str, **kwargs) -> None:
    """Run a model on a task's clean and corrupted prompts and store the activations.

    Prints the run's id on stdout. Rerunning an ingest is safe: a complete run with the same
    arguments is returned as it is (--again makes a new run), an interrupted one is resumed
    (--restart discards its arrays and rows and ingests it again under the same run id).
    With --shard i/N it prints the shard's manifest path instead; run every shard (any
    machines sharing STORE), then actstore merge.

    \b
    Example:
      actstore ingest /tmp/s --model toy --task ioi --n 64
      actstore ingest /tmp/s --model gpt2 --task ioi --corruption gaussian --dtype float16
      actstore ingest file:///shared/s --model toy --task ioi --n 4096 --shard 0/4
      actstore ingest /tmp/s --model toy --task ioi --n 64 --restart
      actstore ingest /tmp/s --model toy --task ioi --n 4096 --workers 2
      actstore ingest /tmp/s --model toy --task ioi --arrays-url s3://bucket/acts --workers 2
    """
    kwargs["runtime"] = _runtime(kwargs)
    target = _open(store, create=True)  # made by the ingest's first write, once inputs are good
    if kwargs["shard"] is not None:
        part = target.ingest(**kwargs).to_dicts()[0]
        click.echo(
            f"shard {part['shard']}/{part['n_shards']}: prompts {part['prompt_start']}.."
            f"{part['prompt_stop']}; run actstore merge {store} when every shard is done",
            err=True,
        )
        click.echo(part["manifest"])
        return
    row = target.ingest(**kwargs).to_dicts()[0]
    done = {"existing": "already complete with these arguments (--again for a new run)",
            "resumed": "resumed, complete", "restarted": "restarted, complete"}  # fmt: skip
    click.echo(
        f"run {row['run_id']}: {row['task']} on {row['model']}, {row['n_prompts']} prompts, "
        f"{done.get(row['outcome'], row['status'])}",
        err=True,
    )
    click.echo(row["run_id"])


@main.command()
@click.argument("store")
@FORMAT
def merge(store: str, fmt: str) -> None:
    """Fold sharded ingests' manifests into the catalog (the single catalog writer).

    A run becomes complete when every shard's manifest is there; otherwise it stays
    ingesting and the missing shards are listed. Exit 1 while any shard is missing.

    \b
    Example:
      actstore merge /tmp/s
    """
    rows = _open(store, create=True).merge()  # a store only shards wrote is made here
    write_rows(rows, fmt)
    incomplete = rows.filter(rows["status"] != "complete")
    if incomplete.height:
        raise ActstoreError(
            f"{incomplete.height} sharded run(s) still miss shards "
            f"({'; '.join(incomplete['missing'].to_list())}); run them, then merge again"
        )


@main.command()
@click.argument("store")
@FORMAT
def info(store: str, fmt: str) -> None:
    """Runs, tasks, arrays, bytes stored vs raw (compression ratio) and status.

    \b
    Example:
      actstore info /tmp/s --format json
    """
    write_rows(_open(store).info(), fmt)


@main.command()
@click.argument("store")
@click.argument("query")
@FORMAT
@sql_limits
def sql(store: str, query: str, fmt: str, **limits) -> None:
    """Run one read-only SQL statement against the catalog.

    It reads only the catalog's tables and views, and stops at --timeout, --max-rows or
    --max-mb with one line saying which.

    \b
    Example:
      actstore sql /tmp/s "select run_id, avg(clean_logit_diff) from prompts group by 1"
    """
    write_rows(_open(store).sql(query, **limits), fmt)


@main.command()
@click.argument("store")
@click.argument("table", required=False)
@click.option("--sql", "query", help="A read-only query instead of a table or view.")
@click.option(
    "--format", "fmt", type=click.Choice(FILE_FORMATS), default=EXPORT["fmt"], show_default=True
)
@click.option(
    "-o", "--output", default=EXPORT["out"], show_default=True, help="File, or - for stdout."
)
@sql_limits
def export(
    store: str, table: str | None, query: str | None, fmt: str, output: str, **limits
) -> None:
    """Write a table, view or query to CSV, Parquet, JSON or JSON lines.

    \b
    Example:
      actstore export /tmp/s prompts --format parquet -o prompts.parquet
      actstore export /tmp/s --sql "select * from effects where query_id = 1" -o -
    """
    df = _open(store).export(table=table, sql=query, fmt=fmt, out=output, **limits)
    if output != "-":
        click.echo(f"wrote {df.height} rows to {output}", err=True)


def _patch_direction(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """subspace's --direction is the patching direction, as on every verb; the subspace itself
    was once given there: point a basis to --basis."""
    if value not in choices.DIRECTIONS:
        raise click.BadParameter(
            f"{value!r}: --direction is {'|'.join(choices.DIRECTIONS)} (which run is patched "
            "into which); give the subspace to patch as --basis FILE|mean-diff|das"
        )
    return value


def _renamed(now: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    """A renamed option's old spelling, refused with a pointer to its name now."""

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            raise click.BadParameter(f"{param.opts[0]} is now {now}")

    return refuse


@main.command()
@click.argument("store")
@RUN
@click.option(
    "--hook", required=True, help="blocks.L.hook_resid_pre|mid|post, .mlp.hook_post, .attn.hook_z"
)
@click.option(
    "--basis",
    required=True,
    help="Subspace to patch: a .npy file (d,) or (k, d), mean-diff or das.",
)
@click.option(
    "--head", type=int, help="Head of an attn.hook_z site (default: all heads' z concatenated)."
)
@click.option(
    "--pos", default=SUBSPACE["pos"], show_default=True,
    help="all (real positions), final, roles (IO,S2: each prompt's own positions), or N "
    "where every prompt has one length.",
)  # fmt: skip
@metric_option(SUBSPACE)
@click.option(
    "--direction", default=SUBSPACE["direction"], show_default=True, callback=_patch_direction,
    help="denoise: clean into corrupted; noise: corrupted into clean.",
)  # fmt: skip
@click.option("--reader", help="Residual hooks: the map to split by, L.H.q|k|v, L.mlp or unembed.")
@click.option(
    "--k", type=int, default=SUBSPACE["k"], show_default=True, help="Dimensions (mean-diff, das)."
)
@click.option(
    "--group-by", default=SUBSPACE["group_by"], show_default=True,
    help="mean-diff: side or a prompts column.",
)  # fmt: skip
@click.option(
    "--train-frac", type=float, default=SUBSPACE["train_frac"], show_default=True,
    help="mean-diff/das fit split.",
)  # fmt: skip
@click.option("--seed", type=int, default=SUBSPACE["seed"], show_default=True)
@click.option(
    "--epochs", type=int, default=SUBSPACE["epochs"], show_default=True,
    help="DAS passes over the split.",
)  # fmt: skip
@click.option(
    "--lr", type=float, default=SUBSPACE["lr"], show_default=True, help="DAS Adam learning rate."
)
@click.option("--save-basis", type=click.Path(), help="Write the patched basis (k, d) to .npy.")
@click.option(
    "--save-direction", hidden=True, expose_value=False, callback=_renamed("--save-basis FILE.npy")
)
@RECOMPUTE
@runtime_options(distributed=False)
@FORMAT
def subspace(store: str, run: int, hook: str, basis: str, fmt: str, **kwargs) -> None:
    """Patch a subspace at a cached hook and check it for the interpretability illusion.

    Reports the effect of patching v, of its rowspace and nullspace parts under the map that
    reads the hook (MLP W_out, head W_O, or --reader), their variances, and full patching of the
    activation; flags an illusion (see docs/subspace.md). Stored in effects/subspace_reports.

    \b
    Example:
      actstore subspace /tmp/s --run 1 --hook blocks.3.hook_resid_mid --basis das --pos final
      actstore subspace /tmp/s --run 1 --hook blocks.2.mlp.hook_post --basis v.npy
    """
    if kwargs["save_basis"] is not None:
        check_output_path(kwargs["save_basis"], "--save-basis")
    rows = _open(store).subspace(run, hook, basis, runtime=_runtime(kwargs), **kwargs)
    write_rows(rows, fmt)
    sys.stdout.flush()
    from queries.analysis.lookups import illusion_verdict

    click.echo(f"query {rows['query_id'][0]}: {illusion_verdict(rows['illusion'][0])}", err=True)


@main.command()
@click.argument("store")
@RUN
@click.option(
    "--method",
    type=click.Choice(choices.METHODS),
    required=True,
    help="atp: node AtP; eap: one gradient; eap-ig: integrated gradients over the input; "
    "exact: every edge patched alone (what eap estimates).",
)
@click.option("--steps", type=int, help="Integration steps of eap-ig methods (default 5).")
@click.option(
    "--level", type=click.Choice(choices.LEVELS), help="Default: node for atp, else edge."
)
@metric_option(ATTRIBUTE)
@TOP
@RECOMPUTE
@runtime_options(distributed=True)
@FORMAT
def attribute(store: str, run: int, top: int | None, fmt: str, **kwargs) -> None:
    """Score every edge (or node) of a run by attribution; rows sorted by |score|.

    The score set's id (score_id) is what actstore circuit --scores takes.

    \b
    Example:
      actstore attribute /tmp/s --run 1 --method eap-ig --steps 5 --top 20
      actstore attribute /tmp/s --run 1 --method atp --format csv
      actstore attribute /tmp/s --run 1 --method eap-ig --workers 2
      actstore attribute /tmp/s --run 1 --method exact --top 20
      actstore sql /tmp/s "select src, dst, qkv, score from edge_scores where score_id = 1
                           order by abs(score) desc limit 100"
      actstore sql /tmp/s "select method_a, method_b, spearman from score_agreement"
    """
    df = _open(store).attribute(run, runtime=_runtime(kwargs), **kwargs)
    if df.height:
        click.echo(f"score set {df['score_id'][0]}: {df.height} rows", err=True)
    write_rows(df.head(top) if top is not None else df, fmt)


@main.command()
@click.argument("store")
@RUN
@click.option(
    "--from", "source", default=ATTENTION["source"], show_default=True,
    help="The role attended from.",
)  # fmt: skip
@click.option("--to", help="Roles attended to, e.g. IO,S1,S2 [default: every role].")
@click.option(
    "--side", type=click.Choice(choices.SIDES), default=ATTENTION["side"], show_default=True
)
@RECOMPUTE
@batch_size_option(ATTENTION)
@runtime_options(distributed=False)
@FORMAT
def attention(store: str, run: int, fmt: str, **kwargs) -> None:
    """Per head, the mean attention probability from one role's token to others'.

    Recomputed from the stored residual stream through the engine every query uses (each
    prompt read at its own positions of the roles); rows land in the attention table.

    \b
    Example:
      actstore attention /tmp/s --run 1 --from END --to IO,S1,S2
      actstore attention /tmp/s --run 1 --to IO --side corrupted --format csv
    """
    write_rows(_open(store).attention(run, runtime=_runtime(kwargs), **kwargs), fmt)


@main.command()
@click.argument("store")
@RUN
@click.option("--side", type=click.Choice(choices.SIDES), default=HEADS["side"], show_default=True)
@RECOMPUTE
@batch_size_option(HEADS)
@runtime_options(distributed=False)
@FORMAT
def heads(store: str, run: int, fmt: str, **kwargs) -> None:
    """Per head, its previous-token, duplicate-token and induction scores on the run's prompts.

    TransformerLens' head_detector.detect_head ("mul"): the share of a head's attention where
    the class's pattern is 1, per prompt, mean over prompts; rows land in head_scores and the
    attention_heads view.

    \b
    Example:
      actstore heads /tmp/s --run 1
      actstore sql /tmp/s "select * from head_scores where class = 'induction' order by value desc"
    """
    write_rows(_open(store).heads(run, runtime=_runtime(kwargs), **kwargs), fmt)


def _old_address(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """reduce's --address once named the scheduler of `--scheduler distributed`: point to the
    one spelling every verb now takes."""
    if value is not None:
        raise UsageError(f"--address {value}: give the scheduler as --scheduler {value}")


@main.command()
@click.argument("store")
@RUN
@click.option("--hook", required=True, help="A stored hook, e.g. blocks.0.hook_resid_pre.")
@click.option(
    "--op", type=click.Choice(choices.OPS), default=REDUCE["op"],
    show_default=True, help="Mean activation, mean per --by group, or mean per-head norm.",
)  # fmt: skip
@click.option("--by", help="Prompts column to group class-mean by (default grp).")
@click.option("--side", type=click.Choice(choices.SIDES), default=REDUCE["side"], show_default=True)
@click.option("--address", hidden=True, callback=_old_address, expose_value=False)
@RECOMPUTE
@runtime_options(distributed=True)
@FORMAT
def reduce(store: str, run: int, hook: str, fmt: str, **kwargs) -> None:
    """Reduce a hook over all prompts out of core (Dask over the Zarr chunks).

    A hook the run derives on read (resid_mid, mlp_out, … under the default hooks) is derived
    chunk by chunk with the run's model. Rows: query_id, hook, grp, pos, idx (flat feature, or
    head), value, n (prompts). The chunks are reduced on this process's threads, or on Dask
    workers with --workers/--scheduler as on every verb.
    Recorded in the reductions table; asking again reads them back.

    \b
    Example:
      actstore reduce /tmp/s --run 1 --hook blocks.3.hook_resid_pre --op mean
      actstore reduce /tmp/s --run 1 --hook blocks.0.attn.hook_z --op head-norm \\
          --scheduler tcp://10.0.0.5:8786
    """
    write_rows(_open(store).reduce(run, hook, runtime=_runtime(kwargs), **kwargs), fmt)


# ---- analysis: overlap, plot, demo -------------------------------------------------------------

SET_OPTIONS = [
    click.option("--by", type=click.Choice(choices.SETS), default=OVERLAP["by"], show_default=True,
                 help="Compare head sets (patching) or edge sets (attribution)."),
    click.option("--top-frac", type=float,
                 help="Top fraction by importance (default 0.02, at least 4 heads or 20 edges)."),
    click.option("--top-k", type=int, help="Top K by importance instead of a fraction."),
    click.option("--circuits", is_flag=True, help="Each run's circuit instead."),
    click.option("--queries", help="Comma-separated patch query, score set or circuit ids to "
                 "compare, instead of choosing by run."),
    click.option("--metric", type=click.Choice(choices.METRICS),
                 help="Only sets from queries of this metric."),
    click.option("--component", type=click.Choice(choices.HEAD_COMPONENTS),
                 help="Patching component the head sets come from (default head)."),
    click.option("--direction", type=click.Choice(choices.DIRECTIONS),
                 help="Only head sets from patching in this direction."),
    click.option("--window", type=int, help="Only head sets from patching with this window."),
    click.option("--method", type=click.Choice(choices.METHODS),
                 help="Only score sets (or circuits) of this method."),
]  # fmt: skip


def set_options(fn):
    for option in reversed(SET_OPTIONS):
        fn = option(fn)
    return fn


def _ids(text: str | None, option: str) -> list[int] | None:
    from queries.analysis.overlap import parse_ids

    return None if text is None else parse_ids(text, option)


@main.command()
@click.argument("store")
@click.option("--runs", help="Comma-separated run ids, e.g. 1,2,3.")
@set_options
@FORMAT
def overlap(store: str, runs: str | None, queries: str | None, fmt: str, **options) -> None:
    """Overlap of runs' top heads or edges: intersection, IoU, |A∩B|/|A|, hypergeometric p.

    One row per ordered pair of runs (diagonal included): a long-form matrix. Like is compared
    with like: every set comes from a source of one setting (component, metric, direction and
    window of a patching query; method, metric and steps of a score set) over runs of one
    corruption. Each run's set comes from its newest source of the setting all runs share, or
    from the ids given with --queries; a mismatch or an ambiguity is refused, naming it. The
    sources used are printed on stderr and are the rows' source_a/source_b and setting.

    \b
    Example:
      actstore overlap /tmp/s --runs 1,2 --top-frac 0.02
      actstore overlap /tmp/s --runs 1,2 --top-k 4 --metric kl --direction noise
      actstore overlap /tmp/s --queries 1,2 --top-k 4
      actstore overlap /tmp/s --runs 1,2,3 --by edge --top-k 100 --format csv
    """
    if runs is None and queries is None:
        raise UsageError("give --runs R1,R2,... or --queries Q1,Q2,...")
    from queries.analysis.overlap import choose, compared, few_items, sizes

    df = _open(store).overlap(_ids(runs, "--runs"), queries=_ids(queries, "--queries"), **options)
    selection = choose(options["by"], options["top_k"], options["top_frac"], options["circuits"])
    click.echo(f"{compared(df)}; {sizes(df, selection)}", err=True)
    warning = few_items(df, selection)
    if warning:
        click.echo(warning, err=True)
    write_rows(df, fmt)


@main.command()
@click.argument("store")
@click.argument("kind", type=click.Choice(choices.PLOTS))
@click.argument("ident", metavar="ID")
@click.option("-o", "--output", required=True, help="PNG file to write.")
@set_options
def plot(store: str, kind: str, ident: str, output: str, queries: str | None, **options) -> None:
    """Write a PNG: a patch query's effects, runs' overlap matrix, or a faithfulness curve.

    ID is a patch query id (effects: importance for noising and KL, the signed normalized
    effect otherwise), comma-separated run ids (overlap, like with like as in actstore
    overlap; the set options apply, --queries picks the sources) or an edge score set id
    (faithfulness).

    \b
    Example:
      actstore plot /tmp/s effects 3 -o heads.png
      actstore plot /tmp/s overlap 1,2 --top-k 5 -o overlap.png
      actstore plot /tmp/s overlap 1,2 --queries 3,4 --by edge --top-k 20 -o edges.png
      actstore plot /tmp/s faithfulness 4 -o faithfulness.png
    """
    _open(store).plot(kind, ident, output, queries=_ids(queries, "--queries"), **options)
    click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("store")
@click.option("-o", "--output", required=True, help="HTML file to write.")
@click.option("--runs", help="Comma-separated run ids to cover (default: every run).")
@click.option("--top-k", type=int, help="Overlap head sets: top K heads by importance.")
@click.option(
    "--top-frac",
    type=float,
    help="Overlap head sets: top fraction (default 0.02, at least 4 heads).",
)
@click.option("--edge-top-k", type=int, help="Overlap edge sets: top K edges by |score|.")
@click.option(
    "--edge-top-frac",
    type=float,
    help="Overlap edge sets: top fraction (default 0.02, at least 20 edges).",
)
@FORMAT
def report(store: str, output: str, runs: str | None, fmt: str, **options) -> None:
    """Write one self-contained interactive HTML page about the store.

    Runs with provenance, a heatmap per patching query, overlap matrices, faithfulness curves,
    circuit graphs and subspace reports; hover shows each number. Scripts and styles are
    inlined: the file opens offline. Prints one row per chart.

    \b
    Example:
      actstore report /tmp/s -o report.html
      actstore report /tmp/s -o ioi.html --runs 1,2 --top-k 4
    """
    from pathlib import Path

    from queries.analysis.overlap import parse_ids

    ids = parse_ids(runs) if runs is not None else None
    write_rows(_open(store).report(output, ids, **options), fmt)
    size = Path(output).stat().st_size
    click.echo(f"wrote {output} ({size / 1e6:.1f} MB)", err=True)


@main.command()
@click.argument("directory", required=False)
@click.option(
    "--tasks",
    default=",".join(DEMO["tasks"]),
    show_default=True,
    help="Comma-separated tasks to ingest and compare.",
)
@click.option("--n", type=int, default=DEMO["n"], show_default=True, help="Prompt pairs per task.")
@click.option(
    "--top-k", type=int, default=DEMO["top_k"], show_default=True, help="Heads per task compared."
)
@click.option(
    "--model",
    help="Model to run on: toy (default), toy-llama, a directory or a hub name.",
)
def demo(directory: str | None, tasks: str, n: int, top_k: int, model: str | None) -> None:
    """Run the whole pipeline on the built-in toy model and print what it found.

    Ingests each task, patches every head, runs EAP-IG, prints the top heads per task by
    importance and their overlap, finds the smallest EAP-IG circuit reaching 85% faithfulness,
    scores Greater-Than by Hanna et al.'s prob-diff, writes plots into DIRECTORY (default: a
    new temporary directory), and shows `actstore sql` lines to try next. Rerunning on the same
    DIRECTORY reuses its runs.

    \b
    Example:
      actstore demo demo-store
      actstore demo demo-llama --model toy-llama
      actstore demo demo-mine --model ./my-model
    """
    if model:
        from actstore.model.model_spec import check_model_spec

        check_model_spec(model)  # before the demo directory is made
    from actstore.app.demo import demo as run_demo

    run_demo(directory, tasks=tasks.split(","), n=n, top_k=top_k, model=model)


@main.command()
@click.argument("store")
@click.option("--run", type=int, help="Check one run only.")
@click.option(
    "--repair", is_flag=True, help="Recompute damaged or missing chunks (needs the run's model)."
)
@DEVICE
@FORMAT
def verify(store: str, run: int | None, repair: bool, device: str | None, fmt: str) -> None:
    """Check every chunk's checksum against the ledger and every complete run for completeness.

    Prints one row per damaged or missing piece (run, side, hook, chunk, prompt range) and
    exits 1 if there is any; --repair first re-ingests just the damaged chunks.

    \b
    Example:
      actstore verify /tmp/s
      actstore verify /tmp/s --run 2 --repair
    """
    from actstore.core.verify import chunks_checked, failures

    s = _open(store)
    if repair:
        from actstore.core.runtime import Runtime

        repaired = s.repair(run=run, runtime=Runtime(device=device))
        if repaired.height:
            write_rows(repaired, fmt)
    findings = s.verify(run=run)
    bad = failures(findings)
    if findings.height:
        write_rows(findings, fmt)
    if bad.height:
        runs = ", ".join(str(r) for r in bad["run_id"].drop_nulls().unique().sort().to_list())
        where = f" in run(s) {runs}" if runs else ""
        hint = "" if repair else "; try actstore verify --repair"
        raise ActstoreError(f"{store}: {bad.height} damaged or missing piece(s){where}{hint}")
    click.echo(f"{store}: {chunks_checked(s, run)} chunks verified, no damage", err=True)


@main.command()
@click.argument("store")
@click.option("--scores", type=int, required=True, help="Edge score set id (actstore attribute).")
@click.option(
    "--edges", metavar="N[,N…]",
    help="Take the top N edges by |score| (all: every edge); a list (0,10,50,all) measures "
    "every size in one pass.",
)  # fmt: skip
@click.option("--faithfulness", type=float, help="Smallest top-N circuit reaching this.")
@click.option(
    "--prune/--no-prune", default=CIRCUIT["prune"], show_default=True,
    help="Drop edges with no circuit path to the logits (never changes faithfulness).",
)  # fmt: skip
@click.option(
    "--metric", type=click.Choice(choices.METRICS),
    help="Measure faithfulness in this metric (e.g. accuracy) [default: the scores' metric].",
)  # fmt: skip
@RECOMPUTE
@runtime_options(distributed=True)
@FORMAT
def circuit(store: str, fmt: str, **kwargs) -> None:
    """Select a circuit from edge scores and measure its exact faithfulness.

    Faithfulness = (m(C) - m(corrupted)) / (m(model) - m(corrupted)), every edge outside C
    carrying its corrupted value. A list of sizes prints one row per size, measured in one
    pass; the largest is the recorded circuit. The circuit's edges and the measured sizes
    (the list, or the search's) are in circuit_edges and faithfulness_curve.

    \b
    Example:
      actstore circuit /tmp/s --scores 1 --edges 200
      actstore circuit /tmp/s --scores 1 --edges 0,10,50,100,500,all
      actstore circuit /tmp/s --scores 1 --faithfulness 0.85 --workers 2
      actstore circuit /tmp/s --scores 1 --edges 200 --metric accuracy
      actstore sql /tmp/s "select * from faithfulness_curve where circuit_id = 2"
    """
    from queries.attribution.circuits import parse_sizes

    if kwargs["edges"] is not None:
        kwargs["edges"] = parse_sizes(kwargs["edges"])
    write_rows(_open(store).circuit(runtime=_runtime(kwargs), **kwargs), fmt)


@main.command()
@click.argument("store")
@RUN
@click.option(
    "--component",
    type=click.Choice(choices.COMPONENTS),
    required=True,
    help="head: a head at all positions; head-pos, resid, attn-out, mlp-out: by position.",
)
@metric_option(PATCH)
@direction_option(PATCH)
@click.option(
    "--window", type=int, default=PATCH["window"], show_default=True,
    help="Patch layers [l, l+K) together; the row reports l.",
)  # fmt: skip
@click.option(
    "--positions",
    help="Roles (IO,S2,END) or, where every prompt has one length, position numbers "
    "[default: every role; every position of a one-length run].",
)
@RECOMPUTE
@TOP
@batch_size_option(PATCH)
@runtime_options(distributed=True)
@FORMAT
def patch(store: str, run: int, top: int | None, fmt: str, **kwargs) -> None:
    """Exact activation patching from cached activations, recomputing only downstream.

    Prints effects(query_id, layer, head, pos, role, metric, value, normalized) and importance:
    value is the patched run's metric averaged over prompts, normalized is
    (value - m_corrupted) / (m_clean - m_corrupted), importance is |normalized| (denoise) or
    |1 - normalized| (noise), what rankings use. A repeated query is read from the store.

    \b
    Example:
      actstore patch /tmp/s --run 1 --component head --metric logit-diff
      actstore patch /tmp/s --run 1 --component resid --direction noise --format csv
      actstore patch /tmp/s --run 1 --component head-pos --workers 2
      actstore patch /tmp/s --run 1 --component head --top 5
      actstore patch /tmp/s --run 1 --component resid --positions IO,S1,S2,END
    """
    rows = _open(store).patch(run, runtime=_runtime(kwargs), **kwargs)
    if top is not None:
        rows = rows.sort("importance", descending=True, nulls_last=True, maintain_order=True)
    write_rows(rows.head(top) if top is not None else rows, fmt)


@main.command()
@click.argument("store")
@RUN
@click.option("--senders", required=True,
              help="a{L}.h{H}, a{L}.*, m{L} or all, comma-separated.")  # fmt: skip
@click.option(
    "--receivers", required=True,
    help="a{L}.h{H}:q|k|v, a{L}.*:q, a*.*:q (every head after the sender), m{L} or logits, "
    "comma-separated, each patched alone; join with + to patch receivers together.",
)  # fmt: skip
@click.option("--positions", help="Token roles (e.g. END, S2), comma-separated: the sender "
              "changes only there, one row per role. Default: every position.")  # fmt: skip
@metric_option(PATH)
@direction_option(PATH)
@RECOMPUTE
@runtime_options(distributed=True)
@FORMAT
def path(store: str, run: int, positions: str | None, fmt: str, **kwargs) -> None:
    """Path patching: each sender's changed output reaches the receivers only by the direct
    path; everything downstream of them computes freely (Wang et al.).

    Prints path_effects(query_id, sender, receiver, qkv, role, metric, value, normalized),
    importance and each sender's rank within its receiver and role. One receiver per row is
    TransformerLens' get_act_patch_direct_path. A repeated query is read from the store.

    \b
    Example:
      actstore path /tmp/s --run 1 --senders all --receivers logits --positions END
      actstore path /tmp/s --run 1 --senders a0.h1 --receivers 'a*.*:q'
      actstore path /tmp/s --run 1 --senders all --receivers a3.h0:q+a3.h2:q
      actstore path /tmp/s --run 1 --senders all --receivers logits --workers 2
      actstore sql /tmp/s "select * from top_senders where rank <= 5"
    """
    roles = None if positions is None else positions.split(",")
    runtime = _runtime(kwargs)
    write_rows(_open(store).path_patch(run, positions=roles, runtime=runtime, **kwargs), fmt)


@main.command()
@click.argument("store")
@RUN
@click.option("--heads", required=True, help="a{L}.h{H} or a{L}.*, comma-separated.")
@click.option("--attend", required=True, help="The role the heads attend to (e.g. IO).")
@click.option("--at", default=INTERVENE["at"], show_default=True,
              help="The role whose attention is edited (the query position).")  # fmt: skip
@click.option("--weight", type=float, default=INTERVENE["weight"], show_default=True,
              help="W: attention becomes (1-W)*own + W*one-hot(attend).")  # fmt: skip
@metric_option(INTERVENE)
@RECOMPUTE
@runtime_options(distributed=True)
@FORMAT
def intervene(store: str, run: int, fmt: str, **kwargs) -> None:
    """Edit heads' attention and recompute downstream (Merullo et al.'s repair).

    At each prompt's --at position the chosen heads' attention becomes (1-W) times their own
    plus W on the --attend role. Prints interventions(query_id, prompt_idx, metric,
    value_before, value_after, accuracy_before, accuracy_after): first the run (prompt_idx
    empty: means, accuracy the share of prompts right), then each prompt.

    \b
    Example:
      actstore intervene /tmp/s --run 1 --heads a2.h1,a3.h0 --attend IO
      actstore intervene /tmp/s --run 1 --heads a3.* --attend S2 --weight 0.5 --format csv
      actstore intervene /tmp/s --run 1 --heads a2.h1 --attend IO --workers 2
    """
    write_rows(_open(store).intervene(run, runtime=_runtime(kwargs), **kwargs), fmt)


if __name__ == "__main__":
    main()
