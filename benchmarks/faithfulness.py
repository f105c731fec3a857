"""Faithfulness curves of EAP and EAP-IG circuits on a toy model and IOI.

    PYTHONPATH=. python benchmarks/faithfulness.py [--model toy] [--n 64] [--target 0.85]

Ingests IOI, scores every edge with EAP and EAP-IG (5 steps), and for each prints the
faithfulness curve (top-N edges, pruned, exact faithfulness) and the smallest circuit reaching
the target. Numbers quoted in docs/attribution.md come from this script.
"""

from __future__ import annotations

from ioi_store import parser, temporary_ioi_store

from actstore.core.runtime import Runtime
from queries.attribution import attribute, circuit, stored_curve


def main() -> None:
    options = parser(__doc__, model="toy", n=64)
    options.add_argument("--target", type=float, default=0.85)
    args = options.parse_args()
    with temporary_ioi_store(args, batch_size=32) as store:
        run = store.query("SELECT avg(clean_logit_diff), avg(corrupted_logit_diff) FROM prompts")
        print(f"{args.model} IOI, {args.n} prompts: logit diff clean {run.item(0, 0):.3f}, "
              f"corrupted {run.item(0, 1):.3f}")  # fmt: skip
        for method in ("eap", "eap-ig"):
            scores = attribute(store, 1, method, runtime=Runtime(device=args.device))
            sid = int(scores["score_id"][0])
            row = circuit(store, sid, faithfulness=args.target,
                          runtime=Runtime(device=args.device))  # fmt: skip
            found = row.row(0, named=True)
            print(f"\n{method} ({scores.height} edges): faithfulness curve")
            curve = stored_curve(store, found["circuit_id"])
            for n, kept, faith, _ in curve.iter_rows():
                print(f"  top {n:>6}  ({kept:>6} after pruning)  faithfulness {faith:8.4f}")
            print(f"  smallest circuit reaching {args.target}: top {found['top_n']} edges "
                  f"({found['n_edges']} after pruning), faithfulness "
                  f"{found['faithfulness']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
