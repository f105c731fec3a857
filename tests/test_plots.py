"""Plots: valid PNG files of the documented size, from the CLI and the API; clear errors."""

from __future__ import annotations

import struct

import handbuilt
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

import actstore
from actstore.app.cli import main
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.results import record_query
from queries.analysis import plot as plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must come first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize(
    "kind, ident",
    [("effects", "patch1"), ("effects", "resid1"), ("overlap", None), ("faithfulness", "scores1")],
)
def test_cli_plot_writes_png_of_expected_size(hand_store, tmp_path, kind, ident):
    path, ids = hand_store
    out = tmp_path / f"{kind}.png"
    arg = "1,2" if ident is None else str(ids[ident])
    res = CliRunner().invoke(main, ["plot", str(path), kind, arg, "-o", str(out), "--top-k", "3"])
    assert res.exit_code == 0, res.output
    assert png_size(out) == plots.SIZE
    assert not list(tmp_path.glob(".*partial*"))


def test_plot_returns_plotted_rows_and_custom_size(hand_store, tmp_path):
    path, ids = hand_store
    store = actstore.open(str(path))
    df = plots.plot_effects(store, ids["patch1"], tmp_path / "h.png", size=(400, 300))
    assert png_size(tmp_path / "h.png") == (400, 300)
    assert df.height == 12 and df["plotted"].to_list() == df["normalized"].to_list()
    ov = store.plot("overlap", "1,2", str(tmp_path / "o.png"), by="edge", circuits=True)
    assert ov.filter(ov["run_a"] != ov["run_b"])["intersection"].to_list() == [3, 3]
    curve = store.plot("faithfulness", str(ids["scores2"]), str(tmp_path / "f.png"))
    assert curve.filter(curve["source"] == "circuit")["faithfulness"].to_list() == [1.0]


def test_noising_and_kl_heatmaps_show_importance(tmp_path):
    """A KL noising query's normalized effects sit near 1 for every head; the heatmap shows
    importance instead, on which the planted heads stand out."""
    ids = handbuilt.build(tmp_path / "store")
    store = actstore.open(str(tmp_path / "store"))
    noise = handbuilt.record_noise(store, 1)
    df = plots.plot_effects(store, noise, tmp_path / "noise.png")
    assert df["plotted"].to_list() == df["importance"].to_list()
    top = df.sort("plotted", descending=True).head(3)
    assert list(zip(top["layer"], top["head"], strict=True)) == [(0, 1), (2, 3), (1, 0)]
    assert df["plotted"].max() > 100 * df.filter(df["head"] == 3, df["layer"] == 1)["plotted"][0]
    signed = plots.plot_effects(store, ids["patch1"], tmp_path / "denoise.png")
    assert signed["plotted"].to_list() == signed["normalized"].to_list()


def test_overlap_heatmap_masks_the_diagonal_and_lists_shared_heads(hand_store, tmp_path):
    path, _ = hand_store
    store = actstore.open(str(path))
    df = store.plot("overlap", "1,2", str(tmp_path / "o.png"), top_k=3)
    labels, grid, bounds = plots.overlap_grid(df)
    assert labels == ["run 1 ioi", "run 2 colored-objects"]
    assert np.isnan(np.diag(grid)).all() and grid[0, 1] == grid[1, 0] == 0.5
    assert bounds == (0.0, 1.0)
    # what the PNG was drawn with: the IoU axes' colour limits are 0–1 whatever the largest IoU
    # (so 0.5 is mid-scale, not the brightest colour), and the title states k and the universe
    (matrix, *_) = plots.rendered_axes(tmp_path / "o.png")
    assert matrix["clim"] == [0.0, 1.0]
    assert matrix["title"].endswith("top 3 heads:\nsets of k = 3 heads of 12")
    pair = df.filter(df["run_a"] == 1, df["run_b"] == 2).row(0, named=True)
    assert pair["shared"] == ["a0.h1", "a2.h3"] and pair["intersection"] == 2
    assert "a0.h1, a2.h3" in plots._shared_text(df, labels)
    edges = store.plot("overlap", "1,2", str(tmp_path / "e.png"), by="edge", top_k=4)
    shared = edges.filter(edges["run_a"] == 2, edges["run_b"] == 1)["shared"].to_list()[0]
    assert shared == ["a1.h0->a2.h3<v>", "a2.h3->logits", "m1->a2.h3<q>"]


def test_plot_errors(hand_store, tmp_path):
    path, ids = hand_store
    store = actstore.open(str(path))
    with pytest.raises(UsageError, match="is a .attribute. query, not a patch query"):
        store.plot("effects", str(ids["scores1"]), str(tmp_path / "x.png"))
    with pytest.raises(UsageError, match="takes one ID"):
        store.plot("effects", "1,2", str(tmp_path / "x.png"))
    with pytest.raises(UsageError, match="--queries applies to plot overlap"):
        store.plot("effects", "1", str(tmp_path / "x.png"), queries=[1, 2])
    with pytest.raises(ActstoreError, match="cannot write"):
        store.plot("effects", str(ids["patch1"]), str(tmp_path / "missing" / "x.png"))
    res = CliRunner().invoke(main, ["plot", str(path), "effects", "99", "-o", "x.png"])
    assert res.exit_code == 2 and res.output.startswith("error: query 99 is not in")


def test_plot_faithfulness_hints_a_command_that_works_for_the_id(hand_store, tmp_path):
    """For each kind of id, the hint names a command that succeeds on this store."""
    path, ids = hand_store
    store = actstore.open(str(path))
    out = str(tmp_path / "f.png")
    cases = {
        ids["circuit1"]: f"actstore plot {path} faithfulness {ids['scores1']} -o faithfulness.png",
        ids["patch1"]: f"actstore plot {path} faithfulness {ids['scores1']} -o faithfulness.png",
    }
    for ident, hint in cases.items():
        with pytest.raises(UsageError) as exc:
            store.plot("faithfulness", str(ident), out)
        assert str(exc.value).endswith(hint)
        res = CliRunner().invoke(main, [*hint.split()[1:-2], "-o", out])
        assert res.exit_code == 0, res.output


def test_plot_faithfulness_without_a_curve_names_the_circuit_command(tmp_path):
    handbuilt.build(tmp_path / "store")
    store = actstore.open(str(tmp_path / "store"))
    fresh = record_query(
        store, "attribute", 1, {"method": "eap", "level": "edge", "metric": "logit-diff"}, 0.1,
        {"edge_scores": handbuilt.edge_scores(1)},
    )  # fmt: skip
    with pytest.raises(ActstoreError) as exc:
        store.plot("faithfulness", str(fresh), str(tmp_path / "f.png"))
    assert f"run actstore circuit {tmp_path / 'store'} --scores {fresh} --faithfulness 0.85" in str(
        exc.value
    )


def test_faithfulness_axis_is_symlog_from_zero_with_the_empty_circuit(tmp_path):
    """The curve's x-axis starts at 0 edges (linear up to 1, log beyond), so the 0-edge point is
    drawn and no negative half is left empty; the limits are read back from the PNG."""
    ids = handbuilt.build(tmp_path / "store")
    store = actstore.open(str(tmp_path / "store"))
    handbuilt.insert_by_name(store, "faithfulness_curve", pl.DataFrame(
        {"score_id": [ids["scores1"]], "n_edges": [0], "faithfulness": [0.0]},
        schema_overrides={"score_id": pl.Int32, "n_edges": pl.Int32},
    ))  # fmt: skip
    out = tmp_path / "f.png"
    rows = store.plot("faithfulness", str(ids["scores1"]), str(out))
    curve = rows.filter(rows["source"] == "curve")
    assert curve["n_edges"].to_list() == [0, *(n for n, _ in handbuilt.CURVE)]
    (ax,) = plots.rendered_axes(out)
    n_scored = len(handbuilt.EDGES)
    assert (ax["xscale"], ax["xlim"]) == ("symlog", [0.0, float(n_scored)])
    assert ax["ylim"][0] <= 0.0 and ax["ylim"][1] >= 1.0
