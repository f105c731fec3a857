"""The `actstore` command line: a thin layer over the Python functions, one command each.

Results go to stdout, progress and messages to stderr. An expected error prints one line and
exits 1 (runtime) or 2 (usage), never a traceback. Heavy imports (torch, TransformerLens) happen
inside the commands that need a model, so `info`, `sql` and `export` start fast.
"""

from __future__ import annotations

import sys

import click

from actstore.errors import ActstoreError
from actstore.output import FILE_FORMATS, PRINT_FORMATS, write_rows

FORMAT = click.option(
    "--format",
    "fmt",
    type=click.Choice(PRINT_FORMATS),
    default="table",
    show_default=True,
    help="How rows are printed.",
)


class Group(click.Group):
    """Turns expected errors into one line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ActstoreError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _open(path: str):
    import actstore

    return actstore.open(path)


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
    "--model", default="toy", show_default=True, help="Built-in name, HF dir or hub name."
)
@click.option("--task", help="Task name: ioi, colored-objects, greater-than, sva, capital-country.")
@click.option(
    "--n", type=int, help="Number of prompt pairs (default 64 for a task; all of a file)."
)
@click.option(
    "--corruption", type=click.Choice(["str", "gaussian"]), default="str", show_default=True
)
@click.option("--hooks", help="Comma-separated: default, resid_final, resid_pre, z, mlp_post, …")
@click.option("--dataset", type=click.Path(), help="EAP-IG .csv or AutoCircuit .json file.")
@click.option(
    "--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Prompts per chunk.")
@click.option("--device", help="cpu or cuda (default: cuda when available).")
@click.option("--seed", type=int, default=0, show_default=True)
def ingest(store: str, **kwargs) -> None:
    """Run a model on a task's clean and corrupted prompts and store the activations.

    Prints the new run's id on stdout. Rerunning an interrupted ingest with the same
    arguments resumes it.

    \b
    Example:
      actstore ingest /tmp/s --model toy --task ioi --n 64
      actstore ingest /tmp/s --model gpt2 --task ioi --corruption gaussian --dtype float16
    """
    from ingest.runner import ingest as run_ingest

    row = run_ingest(store, **kwargs).to_dicts()[0]
    click.echo(
        f"run {row['run_id']}: {row['task']} on {row['model']}, {row['n_prompts']} prompts, "
        f"{row['status']}",
        err=True,
    )
    click.echo(row["run_id"])


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
def sql(store: str, query: str, fmt: str) -> None:
    """Run one read-only SQL statement against the catalog.

    \b
    Example:
      actstore sql /tmp/s "select run_id, avg(clean_logit_diff) from prompts group by 1"
    """
    write_rows(_open(store).sql(query), fmt)


@main.command()
@click.argument("store")
@click.argument("table", required=False)
@click.option("--sql", "query", help="A read-only query instead of a table or view.")
@click.option("--format", "fmt", type=click.Choice(FILE_FORMATS), default="csv", show_default=True)
@click.option("-o", "--output", default="-", show_default=True, help="File, or - for stdout.")
def export(store: str, table: str | None, query: str | None, fmt: str, output: str) -> None:
    """Write a table, view or query to CSV, Parquet, JSON or JSON lines.

    \b
    Example:
      actstore export /tmp/s prompts --format parquet -o prompts.parquet
      actstore export /tmp/s --sql "select * from effects where query_id = 1" -o -
    """
    df = _open(store).export(table=table, sql=query, fmt=fmt, out=output)
    if output != "-":
        click.echo(f"wrote {df.height} rows to {output}", err=True)


@main.command()
@click.argument("store")
@click.option("--run", "run_id", type=int, required=True, help="Run id (see actstore info).")
@click.option(
    "--component",
    type=click.Choice(["head", "head-pos", "resid", "attn-out", "mlp-out"]),
    required=True,
    help="head: a head at all positions; head-pos, resid, attn-out, mlp-out: by position.",
)
@click.option(
    "--metric", type=click.Choice(["logit-diff", "prob", "kl"]), default="logit-diff",
    show_default=True,
)  # fmt: skip
@click.option(
    "--direction", type=click.Choice(["denoise", "noise"]), default="denoise", show_default=True,
    help="denoise: clean into the corrupted run; noise: corrupted into the clean run.",
)  # fmt: skip
@click.option(
    "--window", type=int, default=1, show_default=True,
    help="Patch layers [l, l+K) together; the row reports l.",
)  # fmt: skip
@click.option("--recompute", is_flag=True, help="Compute again even if asked before.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per batch.")
@click.option("--device", help="cpu (default) or cuda.")
@FORMAT
def patch(store: str, run_id: int, fmt: str, **kwargs) -> None:
    """Exact activation patching from cached activations, recomputing only downstream.

    Prints effects(query_id, layer, head, pos, metric, value, normalized): value is the
    patched run's metric averaged over prompts, normalized is
    (value - m_corrupted) / (m_clean - m_corrupted). A repeated query is read from the store.

    \b
    Example:
      actstore patch /tmp/s --run 1 --component head --metric logit-diff
      actstore patch /tmp/s --run 1 --component resid --direction noise --format csv
    """
    write_rows(_open(store).patch(run_id, **kwargs), fmt)


if __name__ == "__main__":
    main()
