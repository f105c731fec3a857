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
    "--method",
    type=click.Choice(["atp", "eap", "eap-ig", "eap-ig-activations"]),
    required=True,
    help="atp: node AtP; eap: one gradient; eap-ig: integrated gradients over the input.",
)
@click.option("--steps", type=int, help="Integration steps of eap-ig methods (default 5).")
@click.option(
    "--level", type=click.Choice(["node", "edge"]), help="Default: node for atp, else edge."
)
@click.option(
    "--metric", type=click.Choice(["logit-diff", "prob", "kl"]), default="logit-diff",
    show_default=True,
)  # fmt: skip
@click.option("--top", type=int, help="Print only the K largest |score| rows (all are stored).")
@click.option("--device", help="cpu or cuda (default: cuda when available).")
@FORMAT
def attribute(store: str, run_id: int, top: int | None, fmt: str, **kwargs) -> None:
    """Score every edge (or node) of a run by attribution; rows sorted by |score|.

    The score set's id (score_id) is what actstore circuit --scores takes.

    \b
    Example:
      actstore attribute /tmp/s --run 1 --method eap-ig --steps 5 --top 20
      actstore attribute /tmp/s --run 1 --method atp --format csv
      actstore sql /tmp/s "select src, dst, qkv, score from edge_scores where score_id = 1
                           order by abs(score) desc limit 100"
    """
    df = _open(store).attribute(run_id, **kwargs)
    if df.height:
        click.echo(f"score set {df['score_id'][0]}: {df.height} rows", err=True)
    write_rows(df.head(top) if top is not None else df, fmt)


@main.command()
@click.argument("store")
@click.option("--scores", type=int, required=True, help="Edge score set id (actstore attribute).")
@click.option("--edges", type=int, help="Take the top N edges by |score|.")
@click.option("--faithfulness", type=float, help="Smallest top-N circuit reaching this.")
@click.option(
    "--prune/--no-prune", default=True, show_default=True,
    help="Drop edges with no circuit path to the logits (never changes faithfulness).",
)  # fmt: skip
@click.option("--device", help="cpu or cuda (default: cuda when available).")
@FORMAT
def circuit(store: str, fmt: str, **kwargs) -> None:
    """Select a circuit from edge scores and measure its exact faithfulness.

    Faithfulness = (m(C) - m(corrupted)) / (m(model) - m(corrupted)), every edge outside C
    carrying its corrupted value; one forward per circuit. The circuit's edges and the search's
    faithfulness curve are in circuit_edges and faithfulness_curve.

    \b
    Example:
      actstore circuit /tmp/s --scores 1 --edges 200
      actstore circuit /tmp/s --scores 1 --faithfulness 0.85
      actstore sql /tmp/s "select * from faithfulness_curve where circuit_id = 2"
    """
    write_rows(_open(store).circuit(**kwargs), fmt)


if __name__ == "__main__":
    main()
