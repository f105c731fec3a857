"""actstore's side of AutoCircuit's tokens and logits checks (the checkout's .venv; untimed).

Writes OUT.npz with, for run RUN of STORE:
  tokens, corrupted_tokens          the token ids actstore stored (n, seq)
  answer_token, wrong_answer_token  the answer ids actstore tokenized (n,)
  final_logits, corrupted_final     the final-position logits actstore's queries use (derived on
                                    read from the stored final residual: what faithfulness
                                    endpoints read)
  bridge_logits                     every position's logits of actstore's model adapter (the
                                    TransformerLens 4 bridge forward that ingest runs), clean
Usage: python actstore_logits.py STORE RUN OUT.npz
"""

import sys

import numpy as np
import torch

from actstore.core.store import Store
from actstore.model.adapter import load_model
from queries.core.reader import DerivedArray

store_path, run_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = Store(store_path)
run = store.run(run_id)
tokens = np.asarray(store.read(run_id, "clean", "tokens"))
corrupted = np.asarray(store.read(run_id, "corrupted", "tokens"))
answers = store.query(
    "SELECT answer_token, wrong_answer_token FROM prompts WHERE run_id = ? ORDER BY prompt_idx",
    [run_id],
)
final = DerivedArray(store, run_id, "clean", "logits", device="cpu")[:]
corrupted_final = DerivedArray(store, run_id, "corrupted", "logits", device="cpu")[:]
adapter = load_model(run["model"], "cpu")
with torch.no_grad():
    bridge = torch.cat(
        [adapter.hooked_logits(torch.as_tensor(tokens[i : i + 16]).long())
         for i in range(0, len(tokens), 16)]
    ).float().numpy()  # fmt: skip
np.savez(
    out,
    tokens=tokens,
    corrupted_tokens=corrupted,
    final_logits=final,
    answer_token=answers["answer_token"].to_numpy(),
    wrong_answer_token=answers["wrong_answer_token"].to_numpy(),
    corrupted_final=corrupted_final,
    bridge_logits=bridge,
)
print(f"wrote {out}: tokens {tokens.shape}, bridge logits {bridge.shape}, final {final.shape}")
