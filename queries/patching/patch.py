"""Exact activation patching from the store: `actstore patch` and `ActStore.patch`.

Components (rows of `effects`):
- head: one head's output (hook_z) at every position → (layer, head);
- head-pos: one head's output at one position → (layer, head, pos);
- resid: resid_pre at one position → (layer, pos);
- attn-out / mlp-out: the attention's / the MLP's output at one position → (layer, pos).
`window=K` patches the component at the K consecutive layers [l, l+K) together and reports the
row at l (Zhang & Nanda's sliding window); only full windows, so l runs over 0..n_layers−K.
`layers` restricts the rows to those layers l (what TransformerLens' patching does with an
index_df): on a large model a sweep over a few layers costs a fraction of the whole.
Positions are roles (actstore.core.roles: IOI's IO, S1, S2, END, …), each patched in every prompt
wherever that prompt has it, or absolute numbers on a run whose prompts share one length
(elsewhere a number is a different token in each prompt, and is refused). By default a run of
one length sweeps every position, a run of several lengths every role. A role's rows carry
`role` (and `pos` where every prompt has the role at one position). Within a batch, prompts
with a role at the same position are patched together.

Directions: denoise patches the clean run's activation into the corrupted run, noise the
corrupted run's into the clean run; both runs are read from the store, never recomputed.
`value` is the metric of the patched run averaged over prompts (what TransformerLens' patching
returns with a mean metric); `normalized` is (value − m_corrupted) / (m_clean − m_corrupted)
for both directions, so 1 is clean-like (see actstore/model/metrics.py).

A query is recorded once (`queries` row + `effects` rows); asking it again reads the stored rows
before torch is imported. Computation: queries/patching/recompute.py (downstream only, cached
keys and values before the patched position) on the engine of queries/core;
queries/patching/reference.py is the slow full-forward path through the bridge's own forward that
tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.core.choices import (
    COMPONENTS,
    DIRECTIONS,
    ENGINES,
    METRICS,
    check,
    check_batch_size,
)
from actstore.core.errors import UsageError
from actstore.core.output import progress_bar
from actstore.core.roles import choose
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from actstore.model.metrics import normalized
from queries.core.recorded import recorded
from queries.core.sweep import RunContext, check_cluster, cluster, in_order, run_context

if TYPE_CHECKING:
    from actstore.model.adapter import ModelAdapter

KIND = "patch"
EFFECT_COLUMNS = ["query_id", "layer", "head", "pos", "role", "metric", "value", "normalized"]
# What a patch query returns: the effects row and its importance, read from the catalog's
# patch_effects view where importance is defined.
RESULT_COLUMNS = [*EFFECT_COLUMNS, "importance"]


@dataclass(frozen=True)
class PatchSpec:
    """What determines a patching query's result (hashed into the `queries` row)."""

    component: str
    metric: str
    direction: str
    window: int
    positions: tuple[int, ...] | None  # None: every position (by-position components)
    layers: tuple[int, ...] | None = None  # None: every layer
    roles: tuple[str, ...] | None = None  # patched by role, wherever each prompt has it

    def params(self) -> dict[str, Any]:
        """The recorded parameters; `layers` and `roles` only when given, so that a query
        without them keeps the identity it had before they could be chosen."""
        d = asdict(self)
        d["positions"] = None if self.positions is None else list(self.positions)
        for key in ("layers", "roles"):
            if d[key] is None:
                del d[key]
            else:
                d[key] = list(d[key])
        return d


def check_spec(
    store: Store,
    run: int,
    component: str,
    metric: str,
    direction: str,
    window: int,
    positions: str | Sequence[int | str] | None,
    layers: list[int] | None = None,
) -> PatchSpec:
    """Validate a query against the run (no torch): a UsageError naming the fix otherwise."""
    check("--component", component, COMPONENTS)
    check("--metric", metric, METRICS)
    check("--direction", direction, DIRECTIONS)
    with store.reading():
        info = store.run(run)
        rows = store._trusted_query("SELECT n_layers FROM models WHERE model = ?", [info["model"]])
    n_layers = int(rows.item()) if rows.height else int(info["params"].get("n_layers", 0))
    if not 1 <= window <= n_layers:
        raise UsageError(f"--window {window}: must be between 1 and the model's {n_layers} layers")
    if component == "head":
        if positions is not None:
            raise UsageError("positions apply to by-position components; use --component head-pos")
        chosen = None
    else:
        chosen = choose(store, run, positions)
    if layers is not None:
        last = n_layers - window
        bad = [la for la in layers if not 0 <= la <= last]
        if bad or not layers:
            raise UsageError(
                f"layers {bad or layers}: give layers in 0..{last} (full windows of {window})"
            )
        layers = sorted(set(layers))
    return PatchSpec(component, metric, direction, window,
                     None if chosen is None else chosen.positions,
                     None if layers is None else tuple(layers),
                     None if chosen is None else chosen.roles)  # fmt: skip


def stored_effects(store: Store, query_id: int, roles: Sequence[str] = ()) -> pl.DataFrame:
    """A recorded query's rows, roles in the order asked. A catalog not yet migrated (read-only,
    from before roles) has no role column: its rows have none."""
    rows = with_role(store._trusted_query(
        "SELECT * FROM patch_effects WHERE query_id = ? "
        "ORDER BY layer, head NULLS FIRST, pos NULLS FIRST",
        [query_id],
    ))  # fmt: skip
    if roles:
        order = pl.col("role").replace_strict(list(roles), list(range(len(roles))), default=None)
        rows = rows.sort(pl.col("layer"), pl.col("head"), order, nulls_last=False,
                         maintain_order=True)  # fmt: skip
    return rows.select(RESULT_COLUMNS)


def with_role(rows: pl.DataFrame) -> pl.DataFrame:
    """Effect rows with a `role` column (NULL where the catalog predates it)."""
    if "role" in rows.columns:
        return rows
    return rows.with_columns(pl.lit(None, dtype=pl.String).alias("role"))


def patch(
    store: Store,
    run: int,
    component: str,
    metric: str = "logit-diff",
    direction: str = "denoise",
    window: int = 1,
    positions: str | Sequence[int | str] | None = None,
    layers: list[int] | None = None,
    recompute: bool = False,
    batch_size: int = 8,
    model: ModelAdapter | None = None,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Patching effects of a run, from the catalog when asked before, else computed and recorded.

    Returns effects' columns (query_id, layer, head, pos, role, metric, value, normalized) and
    the direction-independent importance that rankings use. `positions`: role names or (on a
    run of one prompt length) position numbers, as a list or comma-separated text. `runtime`:
    device, progress and where the prompt batches run (actstore/core/runtime.py); the result is
    recorded the same.
    """
    check_batch_size(batch_size)
    spec = check_spec(store, run, component, metric, direction, window, positions, layers)
    check_cluster(runtime)

    def compute() -> dict[str, pl.DataFrame]:
        from queries.core.run_model import model_for_run

        adapter = model_for_run(store.run(run), runtime.device, model)
        frame, _ = compute_effects(store, run, spec, adapter, batch_size=batch_size,
                                   runtime=runtime)  # fmt: skip
        return {"effects": frame}

    return recorded(store, KIND, run, spec.params(), compute,
                    lambda query_id: stored_effects(store, query_id, spec.roles or ()),
                    recompute)  # fmt: skip


def _groups(spec: PatchSpec, n_layers: int, n_heads: int, seq_len: int, engine: str):
    from queries.patching.recompute import Group, Variant

    starts = range(n_layers - spec.window + 1) if spec.layers is None else spec.layers
    windows = [tuple(range(lo, lo + spec.window)) for lo in starts]
    heads = spec.component in ("head", "head-pos")
    variants = [Variant(w, h) for w in windows for h in (range(n_heads) if heads else [None])]
    component = "head" if heads else spec.component
    if spec.component == "head":
        return [Group(component, None, 0, variants)]
    if spec.roles is not None:  # a role's positions differ by prompt: placed per batch
        return [Group(component, None, 0, variants, role) for role in spec.roles]
    positions = spec.positions if spec.positions is not None else range(seq_len)
    return [Group(component, p, p if engine == "downstream" else 0, variants) for p in positions]


def _kinds(component: str, engine: str, parallel: bool) -> tuple[set[str], set[str]]:
    """Which cached activations each side needs: (base kinds, source kinds). Under parallel
    attention and MLP there is no resid_mid: the attention's output is read as stored."""
    attn = {"attn_out"} if parallel else {"resid_pre", "resid_mid"}
    src = {"head": {"z"}, "resid": {"resid_pre"}, "attn-out": attn, "mlp-out": {"mlp_out"}}
    base = {"head": {"resid_pre", "z"} | (set() if parallel else {"resid_mid"}),
            "resid": {"resid_pre"}, "attn-out": {"resid_pre"} | attn,
            "mlp-out": {"resid_pre", "mlp_out"}}  # fmt: skip
    return ({"resid_pre"} if engine == "full-forward" else base[component]), src[component]


class _Setup:
    """What every prompt batch of a patching query shares: the run's context (reader, engine),
    the patch groups."""

    def __init__(self, context: RunContext, spec: PatchSpec, engine: str):
        from queries.patching.batch import hooks_read

        self.spec, self.model, self.mode = spec, context.model, engine
        self.engine = e = context.engine
        self.reader = context.reader
        seq = int(self.reader.run["seq_len"])
        self.groups = _groups(spec, e.n_layers, e.n_heads, seq, engine)
        self.kinds = _kinds(self.groups[0].component, engine, e.arch.parallel)
        self.reader.require(hooks_read(self.kinds[0] | self.kinds[1], e.n_layers), "patching")
        # each prompt's position of each role (n_prompts, n_roles)
        self.at = None if spec.roles is None else context.positions(spec.roles)

    def role_pos(self) -> list[int | None]:
        """Per group, its role's one position when every prompt has it there, else None."""
        if self.at is None:
            return [g.pos for g in self.groups]
        return [int(c[0]) if (c == c[0]).all() else None for c in self.at.T]

    def span_sums(self, span: Any) -> tuple[list[np.ndarray], float, float]:
        """Per group, the metric summed over the span's prompts for every variant; and the
        clean and corrupted endpoints summed over the span."""
        import torch

        from actstore.model import metrics
        from queries.patching.batch import read_batch
        from queries.patching.recompute import PrefixKV

        e, spec = self.engine, self.spec
        at = None if self.at is None else self.at[span.index]
        with torch.inference_mode():
            if at is not None:  # the source is read at every position a role takes here
                patched = tuple(sorted({int(p) for p in at.ravel()}))
            else:
                patched = None if self.groups[0].pos is None else tuple(g.pos for g in self.groups)
            batch = read_batch(self.reader, spec.direction, *self.kinds, e.n_layers, span,
                               self.mode == "full-forward", patched)  # fmt: skip
            clean, corrupted = metrics.endpoints(spec.metric, batch.targets, batch.corrupted_logits)
            prefix = PrefixKV(e, batch)
            out = []
            for j, g in enumerate(self.groups):
                if g.role is None:
                    out.append(self._sums(batch, g, prefix))
                    continue
                total = np.zeros(len(g.variants))
                for p in np.unique(at[:, j]):  # the prompts that have the role at p, together
                    rows = torch.as_tensor(
                        np.flatnonzero(at[:, j] == p), device=batch.finals.device
                    )
                    sub = batch.subset(rows)
                    start = int(p) if self.mode == "downstream" else 0
                    placed = replace(g, pos=int(p), start=start, role=None)
                    total += self._sums(sub, placed, PrefixKV(e, sub))
                out.append(total)
        return out, clean, corrupted

    def _sums(self, batch: Any, g: Any, prefix: Any) -> np.ndarray:
        """The metric of every variant of a group at one position, summed over the batch."""
        import torch

        from actstore.model import metrics
        from queries.patching.recompute import final_resid
        from queries.patching.reference import final_logits

        e, spec, t = self.engine, self.spec, batch.targets
        if self.mode == "full-forward":
            values = torch.stack([
                metrics.from_logits(spec.metric, final_logits(self.model, batch, g, v), t)
                for v in g.variants
            ])  # fmt: skip
        else:
            values = metrics.from_resid(e, spec.metric, final_resid(e, batch, g, prefix), t)
        return values.sum(-1).double().cpu().numpy()


def _span_task(
    span: Any, location: str, run: int, spec: PatchSpec, engine: str, device: str | None
) -> tuple[list[np.ndarray], float, float]:
    """One prompt batch's partial sums, on a Dask worker (the run's context made once there)."""
    return _Setup(run_context(location, run, device), spec, engine).span_sums(span)


def compute_effects(
    store: Store,
    run: int,
    spec: PatchSpec,
    model: ModelAdapter,
    engine: str = "downstream",
    batch_size: int = 8,
    runtime: Runtime = Runtime(),
) -> tuple[pl.DataFrame, float]:
    """Effects rows (layer, head, pos, metric, value, normalized) and the FLOPs it took.

    `engine`: downstream (cached keys/values before the patched position), downstream-no-kv
    (recompute every position downstream) or full-forward (queries.patching.reference); all three
    give the same numbers, the first the fastest. With the runtime's `workers` or `scheduler`
    each prompt batch is a Dask task and the partial sums are added in batch order
    (queries/core/sweep.py).
    """
    check("engine", engine, ENGINES)
    setup = _Setup(RunContext.of(store, run, model), spec, engine)
    reader, e, groups = setup.reader, setup.engine, setup.groups
    n = reader.n
    sums = [np.zeros(len(g.variants)) for g in groups]
    baseline = {"clean": 0.0, "corrupted": 0.0}
    spans = list(reader.spans(batch_size))
    bar = progress_bar(runtime.progress, total=len(spans), desc=f"patch run {run}", unit="batch")
    with cluster(runtime) as client:
        parts = in_order(client, setup.span_sums, _span_task, spans, store.location, run, spec,
                         engine, runtime.device, done=lambda: bar.update(1))  # fmt: skip
        for span_sums, clean, corrupted in parts:  # in batch order: a fixed order of sums
            baseline["clean"] += clean
            baseline["corrupted"] += corrupted
            for gi, values in enumerate(span_sums):
                sums[gi] += values
    bar.close()
    m_clean, m_corrupted = baseline["clean"] / n, baseline["corrupted"] / n
    rows = []
    for g, pos, total in zip(groups, setup.role_pos(), sums, strict=True):
        for v, s in zip(g.variants, total, strict=True):
            value = float(s / n)
            norm = normalized(value, m_clean, m_corrupted)
            rows.append((v.layers[0], v.head, pos, g.role, spec.metric, value, norm))
    frame = pl.DataFrame(
        rows,
        schema={
            "layer": pl.Int32,
            "head": pl.Int32,
            "pos": pl.Int32,
            "role": pl.String,
            "metric": pl.String,
            "value": pl.Float64,
            "normalized": pl.Float64,
        },
        orient="row",
    )  # groups are in position (or the roles') order: a stable sort keeps it within a head
    frame = frame.sort(["layer", "head"], nulls_last=False, maintain_order=True)
    return frame, e.flops
