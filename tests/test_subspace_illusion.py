"""The illusion diagnostics on the distilled example of Makelov, Lange & Nanda, built in code.

A 3-d hidden activation a is read by W (3 -> 2) that sees e2 and e3 only, and the output's logit
difference is the sum of what W reads. On the data a = (c, 0, c) + noise for a binary feature c:
e1 carries the feature but lies in ker W (causally disconnected), e2 is read by W but dormant
(always 0), e3 carries the feature through W (the faithful direction).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from queries.subspace.diagnostics import (
    ILLUSION_DORMANCY,
    PatchBatch,
    components_of,
    evaluate,
    orthonormal_basis,
    report,
    split_by_map,
)

W = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


class Distilled(torch.nn.Module):
    """hidden (3) -W-> readout (2) -> logits (answer 0, wrong 1): logit diff = a2 + a3."""

    def __init__(self):
        super().__init__()
        self.read = torch.nn.Linear(3, 2, bias=False)
        self.unembed = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.read.weight.copy_(W.T.float())
            self.unembed.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))

    def hidden(self, c: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = torch.stack([c, torch.zeros_like(c), c], -1) + noise
        return a[:, None, :]  # (batch, pos=1, 3)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.read(a[:, -1]))


def batches(n: int = 64, seed: int = 0) -> list[PatchBatch]:
    net = Distilled()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        noise = 0.1 * torch.randn(n, 3, generator=gen)
        noise[:, 1] = 0  # e2 is dormant on the data
        clean = net.hidden(torch.ones(n), noise)
        corrupted = net.hidden(-torch.ones(n), noise.flip(0))
        with torch.no_grad():
            out.append(
                PatchBatch(
                    base=corrupted, source=clean, mask=torch.ones(n, 1, 1), run=net,
                    answer=torch.zeros(n, dtype=torch.long), wrong=torch.ones(n, dtype=torch.long),
                    clean_logits=net(clean), corrupted_logits=net(corrupted),
                )
            )  # fmt: skip
    return out


def diagnose(vector: np.ndarray):
    basis = orthonormal_basis(vector)
    comps, dims, null_sq = components_of(basis, W)
    return report(evaluate(batches(), comps, "logit-diff"), "denoise", dims, null_sq)


def by_component(frame) -> dict:
    return {r["component"]: r for r in frame.iter_rows(named=True)}


def test_split_by_map_separates_kernel_and_rowspace():
    v = orthonormal_basis(np.array([1.0, 1.0, 0.0]))
    row, null, null_sq = split_by_map(v, W)
    assert null_sq == pytest.approx(0.5)
    assert torch.allclose(row[:, 0].abs(), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(null[:, 0].abs(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_disconnected_plus_dormant_direction_is_flagged():
    rows = by_component(diagnose(np.array([1.0, 1.0, 0.0]) / math.sqrt(2)))
    # Patching v writes the nullspace part's clean-minus-corrupted difference (2/sqrt 2 along v)
    # into e2: a2 becomes 1, the logit difference moves from -1 to 0, half of the gap.
    assert rows["v"]["normalized"] == pytest.approx(0.5, abs=0.05)
    assert rows["v"]["norm_sq"] == pytest.approx(1.0)
    assert rows["null"]["norm_sq"] == pytest.approx(0.5)
    assert abs(rows["row"]["effect"]) < 1e-6  # e2 alone: no difference to patch
    assert abs(rows["null"]["effect"]) < 1e-6  # e1 alone: W cannot read it
    assert rows["row"]["variance"] < ILLUSION_DORMANCY * rows["v"]["variance"]
    assert rows["v"]["variance"] == pytest.approx(0.5, rel=0.1)  # var(c)/2 with c = ±1
    assert rows["full"]["normalized"] == pytest.approx(1.0, abs=1e-6)
    assert all(r["illusion"] for r in rows.values())


def test_faithful_direction_is_not_flagged():
    rows = by_component(diagnose(np.array([0.0, 0.0, 1.0])))
    assert rows["v"]["normalized"] == pytest.approx(1.0, abs=0.05)
    assert rows["row"]["effect"] == pytest.approx(rows["v"]["effect"])
    assert rows["v"]["norm_sq"] == rows["row"]["norm_sq"] == 1.0
    absent = rows["null"]  # reported, with nothing in it, and not patched
    assert (absent["dim"], absent["norm_sq"], absent["effect"], absent["variance"]) == (0, 0, 0, 0)
    assert rows["row"]["variance"] == pytest.approx(rows["v"]["variance"])
    assert not any(r["illusion"] for r in rows.values())


def test_pure_nullspace_direction_does_nothing_and_is_not_flagged():
    rows = by_component(diagnose(np.array([1.0, 0.0, 0.0])))
    assert abs(rows["v"]["effect"]) < 1e-6 and rows["null"]["norm_sq"] == 1.0
    assert (rows["row"]["dim"], rows["row"]["norm_sq"], rows["row"]["effect"]) == (0, 0.0, 0.0)
    assert rows["v"]["illusion"] is False


@pytest.mark.parametrize("part", ["row", "null"])
def test_round_off_part_is_absent_not_a_direction(part):
    """v built in floating point wholly inside one part leaves a ~1e-16 residual in the other;
    normalised, that residual would be an arbitrary direction. It is reported absent instead."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(w)
    r = torch.randn(16, generator=gen, dtype=torch.float64)
    v = q @ (q.T @ r) if part == "row" else r - q @ (q.T @ r)
    basis = orthonormal_basis(v.numpy())
    other = "null" if part == "row" else "row"
    leftover = basis - q @ (q.T @ basis) if part == "row" else q @ (q.T @ basis)
    assert 0 < float((leftover**2).sum()) < 1e-25  # the residual the old rank test kept
    row, null, null_sq = split_by_map(basis, w)
    parts = {"row": row, "null": null}
    assert parts[part].shape[1] == 1 and parts[other].shape[1] == 0
    assert null_sq == (0.0 if part == "row" else 1.0)
    comps, dims, _ = components_of(basis, w)
    assert other not in comps and dims[other] == 0


@pytest.mark.slow
def test_das_learns_a_direction_that_restores_the_output():
    from queries.subspace.das import train_das

    basis, history = train_das(lambda: batches(seed=0), 3, 1, "logit-diff", "denoise",
                               seed=0, epochs=60, lr=0.05)  # fmt: skip
    assert history[-1] < history[0]
    held_out = evaluate(batches(seed=1), {"v": basis}, "logit-diff")
    clean, corrupted = held_out.clean / held_out.n, held_out.corrupted / held_out.n
    # The faithful direction e3 restores the whole gap; DAS must do at least as well.
    assert (held_out.mean("v") - corrupted) / (clean - corrupted) >= 0.99


def test_cli_prints_the_report_and_errors_in_one_line(ioi_copy, tmp_path):
    from click.testing import CliRunner

    from actstore.app.cli import main

    np.save(tmp_path / "v.npy", np.eye(64)[:2])
    v = str(tmp_path / "v.npy")
    args = ["subspace", str(ioi_copy), "--run", "1", "--hook", "blocks.3.hook_resid_pre",
            "--basis", v, "--pos", "final", "--format", "csv"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("query_id,run_id,hook") and len(lines) == 3  # v, full
    assert "not assessed" in result.stderr
    bad = CliRunner().invoke(main, args[:7] + ["--direction", "sideways"])
    assert bad.exit_code == 2
    # The basis's old spelling: one line pointing to --basis, before anything is read.
    old = CliRunner().invoke(main, args[:6] + ["--direction", v])
    assert old.exit_code == 2 and old.stderr.count("\n") == 1, old.output
    assert (
        "--direction is denoise|noise" in old.stderr and "--basis FILE|mean-diff|das" in old.stderr
    )
    noise = CliRunner().invoke(main, [*args, "--direction", "noise"])
    assert noise.exit_code == 0, noise.output
    assert noise.stdout.splitlines()[1].split(",")[6] == "noise"  # the report's direction column
    bad = CliRunner().invoke(main, args[:5] + ["blocks.3.hook_q", "--basis", "das"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "error: --hook" in bad.stderr
