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
@click.option(
    "--restart", is_flag=True, help="Discard an interrupted run with these arguments and redo it."
)
def ingest(store: str, **kwargs) -> None:
    """Run a model on a task's clean and corrupted prompts and store the activations.

    Prints the new run's id on stdout. Rerunning an interrupted ingest with the same
    arguments resumes it; with --restart it discards the interrupted run's arrays and rows
    and ingests it again under the same run id.

    \b
    Example:
      actstore ingest /tmp/s --model toy --task ioi --n 64
      actstore ingest /tmp/s --model gpt2 --task ioi --corruption gaussian --dtype float16
      actstore ingest /tmp/s --model toy --task ioi --n 64 --restart
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
@click.option("--run", "run_id", type=int, help="Check one run only.")
@click.option(
    "--repair", is_flag=True, help="Recompute damaged or missing chunks (needs the run's model)."
)
@click.option("--device", help="Device for --repair: cpu or cuda.")
@FORMAT
def verify(store: str, run_id: int | None, repair: bool, device: str | None, fmt: str) -> None:
    """Check every chunk's checksum against the ledger and every complete run for completeness.

    Prints one row per damaged or missing piece (run, side, hook, chunk, prompt range) and
    exits 1 if there is any; --repair first re-ingests just the damaged chunks.

    \b
    Example:
      actstore verify /tmp/s
      actstore verify /tmp/s --run 2 --repair
    """
    from actstore.verify import chunks_checked, failures

    s = _open(store)
    if repair:
        repaired = s.repair(run=run_id, device=device)
        if repaired.height:
            write_rows(repaired, fmt)
    findings = s.verify(run=run_id)
    bad = failures(findings)
    if findings.height:
        write_rows(findings, fmt)
    if bad.height:
        runs = ", ".join(str(r) for r in bad["run_id"].unique().sort().to_list())
        hint = "" if repair else "; try actstore verify --repair"
        raise ActstoreError(
            f"{store}: {bad.height} damaged or missing piece(s) in run(s) {runs}{hint}"
        )
    click.echo(f"{store}: {chunks_checked(s, run_id)} chunks verified, no damage", err=True)


if __name__ == "__main__":
    main()
