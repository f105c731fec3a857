"""`actstore subspace`: patch a direction at a cached hook, diagnose it, record the report.

A query fits its direction (mean-diff, DAS) on a seeded training split of the run's prompts and
reports every effect on the held-out rest; a direction from a file is evaluated on all prompts.
The report has one row per component: v itself, its rowspace and nullspace parts under the
hook's reading map (when one is known), and the whole activation (full patching) for scale.
The effect of v goes to the shared `effects` table; the report to `subspace_reports`; the
basis to `subspace_directions`.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import polars as pl

from actstore.core.choices import DIRECTIONS, GRADIENT_METRICS, METRICS, SOURCES, check
from actstore.core.errors import UsageError
from actstore.core.output import check_output_path
from actstore.core.roles import choose
from actstore.core.roles import positions as role_positions
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from actstore.model.hooks import parse_hook
from queries.core.recorded import recorded

REPORT_COLUMNS = [
    "query_id", "run_id", "hook", "layer", "head", "pos", "mode", "metric", "split",
    "n_prompts", "component", "dim", "norm_sq", "variance", "value", "normalized", "effect",
    "illusion",
]  # fmt: skip


def split_indices(n: int, train_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of prompt indices into (train, held-out)."""
    if not 0 < train_frac < 1:
        raise UsageError(f"--train-frac {train_frac}: give a fraction strictly between 0 and 1")
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * train_frac))
    if cut < 1 or cut >= n:
        raise UsageError(
            f"--train-frac {train_frac} leaves no training or no held-out prompts of {n}; "
            "ingest more prompts or change --train-frac"
        )
    return np.sort(order[:cut]), np.sort(order[cut:])


def check_pos(store: Store, run: int, pos: str) -> str:
    """Validate --pos against the run: all, final, role names (IO,S2: each prompt's own
    positions of them), or a position number where every prompt has one length."""
    if pos in ("all", "final"):
        return pos
    chosen = choose(store, run, pos, "--pos")
    if chosen.roles is not None:
        return ",".join(chosen.roles)
    return ",".join(str(p) for p in chosen.positions or ())


def pos_roles(pos: str) -> list[str]:
    """The roles a checked --pos names (none for all, final or numbers)."""
    if pos in ("all", "final") or pos.split(",")[0].lstrip("-").isdigit():
        return []
    return pos.split(",")


def stored_report(store: Store, query_id: int) -> pl.DataFrame:
    return store._trusted_query(
        f"SELECT {', '.join(REPORT_COLUMNS)} FROM subspace_reports WHERE query_id = ? "
        "ORDER BY list_position(['v', 'row', 'null', 'full'], component)",
        [query_id],
    )


def stored_basis(store: Store, query_id: int) -> np.ndarray:
    """The (d, k) basis a query patched along."""
    rows = store._trusted_query(
        "SELECT vector FROM subspace_directions WHERE query_id = ? ORDER BY idx", [query_id]
    )
    return np.array(rows["vector"].to_list(), dtype=np.float64).T


def subspace(
    store: Store,
    run: int,
    hook: str,
    basis: str,
    head: int | None = None,
    pos: str = "all",
    metric: str = "logit-diff",
    direction: str = "denoise",
    reader: str | None = None,
    k: int = 1,
    group_by: str = "side",
    train_frac: float = 0.5,
    seed: int = 0,
    epochs: int = 20,
    lr: float = 0.05,
    save_direction: str | None = None,
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Patch the subspace `basis` (a .npy file, mean-diff or das) at a hook in `direction`
    (denoise or noise) and report the illusion diagnostics (see module doc)."""
    check("--metric", metric, METRICS)
    check("--direction", direction, DIRECTIONS)
    runtime.in_process("subspace")
    if save_direction is not None:
        check_output_path(save_direction, "--save-direction")
    if k < 1:
        raise UsageError(f"--k {k}: need at least one dimension")
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr {lr}: give a positive learning rate (default 0.05)")
    if epochs < 1:
        raise UsageError(f"--epochs {epochs}: need at least one pass")
    info = store.run(run)
    pos = check_pos(store, run, str(pos))
    if basis == "das" and metric not in GRADIENT_METRICS:
        raise UsageError(
            f"--metric {metric}: DAS learns its basis by the metric's gradient and {metric} "
            f"has none; use {', '.join(GRADIENT_METRICS)}, or --basis mean-diff"
        )
    learned = basis in SOURCES
    # Earlier versions recorded `mode` for the direction and `direction` for the basis; their
    # queries are still found (views.LEGACY_KEYS).
    params = {
        "hook": hook, "head": head, "pos": pos, "metric": metric, "direction": direction,
        "reader": reader, "basis": basis,
    }  # fmt: skip
    if not learned:
        path = Path(basis)
        if not path.is_file():
            raise UsageError(f"--basis {basis}: no such file; give a .npy file, mean-diff or das")
        params["basis"] = str(path.resolve())
        params["basis_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    else:
        _check_k(store, info, hook, head, k)
        params.update(k=k, train_frac=train_frac, seed=seed)
        if basis == "mean-diff":
            store.check_prompt_columns([group_by], "--group-by", others=("side",))
            params["group_by"] = group_by
        else:
            params.update(epochs=epochs, lr=lr)

    def read(query_id: int) -> pl.DataFrame:
        if save_direction is not None:
            np.save(save_direction, stored_basis(store, query_id).T)
        return stored_report(store, query_id)

    return recorded(store, "subspace", run, params,
                    lambda: _compute(store, info, params, runtime.device), read,
                    recompute)  # fmt: skip


def _check_k(store: Store, run: dict, hook: str, head: int | None, k: int) -> None:
    """Refuse, before the model loads, more dimensions than the hook's vectors have (the
    model's widths are in the catalog); a hook the model lacks is named once it loads."""
    parsed = parse_hook(hook)
    rows = store._trusted_query("SELECT * FROM models WHERE model = ?", [run["model"]]).to_dicts()
    if parsed is None or not rows:
        return
    m = rows[0]
    z = m["d_head"] if head is not None else m["n_heads"] * m["d_head"]
    width = {"mlp_post": m["d_mlp"], "z": z}.get(parsed[1], m["d_model"])
    if k > width:
        raise UsageError(f"--k {k}: {hook} has {width} dimensions; give --k from 1 to {width}")


def _compute(store: Store, run: dict, params: dict, device: str | None) -> dict[str, pl.DataFrame]:
    """The report, effect and basis rows of a subspace query."""
    import torch

    from queries.core.engine import Engine
    from queries.core.reader import Reader
    from queries.core.run_model import model_for_run
    from queries.subspace.diagnostics import components_of, evaluate, report
    from queries.subspace.directions import from_file, mean_diff
    from queries.subspace.sites import parse_site, reading_map, site_batches

    run_id = int(run["run_id"])
    model = model_for_run(run, device)
    engine = Engine.from_adapter(model)
    reader = Reader(store, run, model.device, engine)
    site = parse_site(model, params["hook"], params["head"])
    w = reading_map(engine, site, params["reader"])
    n = int(run["n_prompts"])
    mode, metric, source = params["direction"], params["metric"], params["basis"]

    roles = pos_roles(params["pos"])
    at = role_positions(store, run_id, roles) if roles else None

    def batches(indices: np.ndarray, patch_mode: str = mode):
        return site_batches(reader, model, engine, site, indices, patch_mode, params["pos"], at)

    if source in SOURCES:
        train, held_out = split_indices(n, params["train_frac"], params["seed"])
        split = "held-out"
        if source == "mean-diff":
            group_by = params["group_by"]
            basis = mean_diff(batches(train, "denoise"), group_by,
                              lambda index: reader.values(group_by, index), params["k"],
                              clean_first=True)  # fmt: skip
        else:
            from queries.subspace.das import train_das

            basis, history = train_das(
                lambda: batches(train), site.dim, params["k"], metric, mode,
                seed=params["seed"], epochs=params["epochs"], lr=params["lr"],
            )  # fmt: skip
            print(f"DAS loss {history[0]:.4g} -> {history[-1]:.4g}", file=sys.stderr)
    else:
        basis, _ = from_file(source, site.dim)
        held_out, split = np.arange(n), "all"
    comps, dims, null_sq = components_of(basis, w)
    with torch.no_grad():
        ev = evaluate(batches(held_out), comps, metric)
    rows = report(ev, mode, dims, null_sq)
    rows = rows.with_columns(
        pl.lit(run_id).alias("run_id"), pl.lit(site.hook).alias("hook"),
        pl.lit(site.layer).alias("layer"), pl.lit(site.head, dtype=pl.Int64).alias("head"),
        pl.lit(params["pos"]).alias("pos"), pl.lit(mode).alias("mode"),
        pl.lit(metric).alias("metric"), pl.lit(split).alias("split"),
        pl.lit(ev.n).alias("n_prompts"), pl.lit(0).alias("query_id"),
    ).select(REPORT_COLUMNS)  # fmt: skip
    v = rows.filter(pl.col("component") == "v").row(0, named=True)
    pos_int = {"all": None, "final": -1}.get(params["pos"], None)
    if params["pos"] not in ("all", "final") and not roles:
        pos_int = int(params["pos"].split(",")[0]) if "," not in params["pos"] else None
    effects = pl.DataFrame(
        {"query_id": [0], "layer": [site.layer], "head": [site.head], "pos": [pos_int],
         "role": [params["pos"] if roles else None],
         "metric": [metric], "value": [v["value"]], "normalized": [v["normalized"]]},
        schema={"query_id": pl.Int64, "layer": pl.Int64, "head": pl.Int64, "pos": pl.Int64,
                "role": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64,
                "normalized": pl.Float64},
    )  # fmt: skip
    vectors = pl.DataFrame(
        {"query_id": [0] * basis.shape[1], "idx": list(range(basis.shape[1])),
         "vector": [basis[:, j].tolist() for j in range(basis.shape[1])]},
        schema={"query_id": pl.Int64, "idx": pl.Int64, "vector": pl.List(pl.Float64)},
    )  # fmt: skip
    return {"effects": effects, "subspace_reports": rows, "subspace_directions": vectors}
