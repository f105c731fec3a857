"""Plots: valid PNG files of the documented size, from the CLI and the API; clear errors."""

from __future__ import annotations

import struct

import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.errors import ActstoreError, UsageError
from queries import plots

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


def test_plot_errors(hand_store, tmp_path):
    path, ids = hand_store
    store = actstore.open(str(path))
    with pytest.raises(UsageError, match="is a .attribute. query, not a patch query"):
        store.plot("effects", str(ids["scores1"]), str(tmp_path / "x.png"))
    with pytest.raises(UsageError, match="takes one ID"):
        store.plot("effects", "1,2", str(tmp_path / "x.png"))
    with pytest.raises(ActstoreError, match="no faithfulness curve or circuits"):
        store.plot("faithfulness", str(ids["patch1"]), str(tmp_path / "x.png"))
    with pytest.raises(ActstoreError, match="cannot write"):
        store.plot("effects", str(ids["patch1"]), str(tmp_path / "missing" / "x.png"))
    res = CliRunner().invoke(main, ["plot", str(path), "effects", "99", "-o", "x.png"])
    assert res.exit_code == 2 and res.output.startswith("error: query 99 is not in")
