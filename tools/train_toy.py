"""Train the built-in toy model: a small GPT-2 that really solves actstore's five tasks.

    python -m tools.train_toy --out actstore/model/builtin/toy [--arch gpt2|llama] [--steps N]
        [--seed S]

Seeded and reproducible on CPU. The training data are the clean prompts of every task's toy
phrasing (word-level tokenizer over the union vocabulary, BOS first as `ModelAdapter.tokenize`
does), with cross-entropy on the answer token only: corrupted prompts never teach an answer.
A fixed 10% of prompt texts (by a hash of the text) is held out of training, and accuracy is
measured on those, generated with a different seed: held-out prompts are new combinations of
names, objects, years, nouns and templates. Capital-country is fact recall, so its held-out
prompts are the same facts in templates that did not carry that country in training.

Two architectures: `gpt2` (the built-in `toy`) and `llama` (`toy-llama`: RMSNorm, rotary
positions, grouped-query attention, SwiGLU). Writes config.json (with its `model_type`, so the
one built-in loader builds either), vocab.json, model.safetensors and CARD.md into --out.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

EVAL_SEED = 1_000_003
HELD_OUT_MOD = 10
ARCH = {
    "model_type": "gpt2",
    "n_layer": 4,
    "n_embd": 128,
    "n_head": 4,
    "n_inner": 512,
    "n_positions": 64,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
LLAMA_ARCH = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
# Share of each task in a batch (times batch_size // 5 rows): the slower-learnt tasks get more.
TASK_WEIGHTS = {"colored-objects": 3, "greater-than": 4}
# Associative-recall rows (`recall_weight` > 0; `recall_units` units of each batch): BOS,
# RECALL_CONTEXT[0]..[1] distinct random words, then RECALL_QUERIES words of that context, each
# followed by the word after it there. Only those followers are scored.
RECALL_CONTEXT = (6, 14)
RECALL_QUERIES = 4
THRESHOLDS = {
    "ioi": 0.95,
    "greater-than": 0.95,
    "sva": 0.90,
    "capital-country": 0.90,
    "colored-objects": 0.85,
}


def is_held_out(text: str) -> bool:
    """The fixed held-out split: prompt texts never trained on."""
    return zlib.crc32(text.encode()) % HELD_OUT_MOD == 0


def toy_tokenizer():
    from actstore.model.tokenizer import word_level_tokenizer
    from ingest.tasks import toy_vocabulary

    return word_level_tokenizer(toy_vocabulary(), name="toy")


def held_out_pairs(task, view, n: int, seed: int = EVAL_SEED) -> list:
    """`n` fresh pairs of `task` from the held-out split, generated with `seed`."""
    pairs: list = []
    batch = 0
    while len(pairs) < n:
        fresh = task.generate(n * HELD_OUT_MOD, seed * 1000 + batch, view)
        pairs.extend(p for p in fresh if is_held_out(p.clean))
        batch += 1
    return pairs[:n]


def _encode(pairs, view) -> tuple:
    """Right-padded BOS-first token ids, last positions, answer and wrong-answer ids."""
    import torch

    tok = view.tokenizer
    bos, pad = tok.bos_token_id, tok.pad_token_id

    def batch_ids(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    seqs = [[bos] + ids for ids in batch_ids([p.clean for p in pairs])]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in seqs])
    ans = torch.tensor([ids[0] for ids in batch_ids([p.answer for p in pairs])])
    wrong = torch.tensor([ids[0] for ids in batch_ids([p.wrong_answer for p in pairs])])
    return tokens, last, ans, wrong


def accuracy(logits_fn: Callable, view, n: int = 200, seed: int = EVAL_SEED) -> dict:
    """Per task: fraction of held-out pairs with clean logit diff > 0, and the mean logit diff.

    `logits_fn(tokens)` returns logits (batch, pos, vocab) for BOS-first, right-padded tokens.
    """
    import torch

    from ingest.tasks import TASKS

    out = {}
    for name, task in TASKS.items():
        pairs = held_out_pairs(task, view, n, seed)
        tokens, last, ans, wrong = _encode(pairs, view)
        with torch.no_grad():
            logits = logits_fn(tokens)[torch.arange(len(pairs)), last]  # right padding: exact
        diff = logits.gather(1, ans[:, None])[:, 0] - logits.gather(1, wrong[:, None])[:, 0]
        out[name] = {"accuracy": float((diff > 0).float().mean()), "logit_diff": float(diff.mean())}
    return out


def recall_rows(n: int, words, bos: int, pad: int, gen) -> tuple:
    """`n` associative-recall rows and their targets (-100 where nothing is scored).

    The copy is an induction step (find the earlier occurrence of the current word, predict the
    word that followed it) at a distance that differs row by row, so no fixed relative offset
    solves it: this is the circuit Colored Objects needs, which a rotary model, lacking
    absolute positions, forms slowly from the five tasks alone.
    """
    import torch

    lo, hi = RECALL_CONTEXT
    width = 1 + hi + 2 * RECALL_QUERIES
    tokens = torch.full((n, width), pad, dtype=torch.long)
    tokens[:, 0] = bos
    targets = torch.full((n, width), -100, dtype=torch.long)
    for r in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        context = words[torch.randperm(len(words), generator=gen)[:length]]
        asked = torch.randint(0, length - 1, (RECALL_QUERIES,), generator=gen)
        pairs = torch.stack([context[asked], context[asked + 1]], 1).reshape(-1)
        row = torch.cat([context, pairs])
        tokens[r, 1 : 1 + len(row)] = row
        targets[r, length + 1 : length + 1 + 2 * RECALL_QUERIES : 2] = context[asked + 1]
    return tokens, targets


def _training_pool(view, seed: int, per_task: int) -> dict:
    from ingest.tasks import TASKS

    pool = {}
    for name, task in TASKS.items():
        pairs = [p for p in task.generate(per_task, seed, view) if not is_held_out(p.clean)]
        pool[name] = _encode(pairs, view)
    return pool


def train(
    out: Path | str,
    steps: int = 4000,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 0.002,
    per_task: int = 10000,
    eval_every: int = 500,
    eval_n: int = 200,
    lm_weight: float = 1.0,
    until_pass: bool = False,
    checkpoint: bool = False,
    d_model: int = 64,
    arch: str = "gpt2",
    n_heads: int = 4,
    n_kv_heads: int = 2,
    rope_theta: float = 10000.0,
    warmup_steps: int = 200,
    attention_bias: bool = False,
    recall_weight: float = 0.0,
    recall_units: int = 2,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict:
    """Train, write the model files into `out`, return the final held-out accuracies."""
    import torch

    from actstore.model.adapter import toy_model
    from actstore.model.tokenizer import SPECIAL_TOKENS
    from ingest.tasks import toy_vocabulary
    from ingest.tasks.base import TokenizerView

    t0 = time.time()
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = toy_tokenizer()
    view = TokenizerView(tokenizer)
    config = model_config(
        arch, len(tokenizer.get_vocab()), d_model, n_heads, n_kv_heads, rope_theta
    )
    if attention_bias:  # q/k biases let a rotary head attend by relative position alone
        config["attention_bias"] = True
    model = toy_model(config)
    pool = _training_pool(view, seed, per_task)
    names = sorted(pool)
    log(f"pool: {', '.join(f'{k}={len(v[0])}' for k, v in pool.items())} ({time.time() - t0:.1f}s)")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(warmup_steps, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    per = batch_size // len(names)

    def logits_fn(tokens):
        return model(tokens).logits

    # Each training row is BOS + clean prompt + answer, right-padded: the answer-token loss
    # teaches the task, the next-token loss over the whole row (weight lm_weight) speeds up the
    # forming of the induction-style heads that IOI and Colored Objects need.
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    width = max(int(pool[k][1].max()) + 2 for k in names)
    tokens = torch.cat(
        [
            torch.nn.functional.pad(pool[k][0], (0, width - pool[k][0].shape[1]), value=pad)
            for k in names
        ]
    )
    last = torch.cat([pool[k][1] for k in names])
    ans = torch.cat([pool[k][2] for k in names])
    tokens[torch.arange(len(tokens)), last + 1] = ans
    starts = [0]
    for k in names:
        starts.append(starts[-1] + len(pool[k][0]))
    counts = [per * TASK_WEIGHTS.get(k, 1) for k in names]
    rows = torch.arange(sum(counts))
    ce = torch.nn.functional.cross_entropy
    if recall_weight:  # its own generator: the task rows drawn are the same with or without
        recall_gen = torch.Generator().manual_seed(seed + 1)
        words = torch.tensor(
            [i for w, i in tokenizer.get_vocab().items() if w not in SPECIAL_TOKENS]
        )

    model.train()
    for step in range(steps):
        idx = torch.cat(
            [
                torch.randint(starts[i], starts[i + 1], (counts[i],), generator=gen)
                for i in range(len(names))
            ]
        )
        batch = tokens[idx]
        logits = model(batch).logits  # right padding: real positions never see a pad
        answer_ce = ce(logits[rows, last[idx]], ans[idx], reduction="none")
        targets = batch[:, 1:].masked_fill(batch[:, 1:] == pad, -100)
        lm = ce(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss = answer_ce.mean() + lm_weight * lm
        if recall_weight:
            recall, recall_targets = recall_rows(per * recall_units, words, bos, pad, recall_gen)
            recall_logits = model(recall).logits
            recall_ce = ce(recall_logits.reshape(-1, logits.shape[-1]), recall_targets.reshape(-1))
            loss = loss + recall_weight * recall_ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step == 0:
            per_task_ce = " ".join(
                f"{k}={c.mean():.2f}" for k, c in zip(names, answer_ce.split(counts), strict=True)
            )
            recall_log = f" recall {recall_ce.item():.3f}" if recall_weight else ""
            log(
                f"step {step + 1}/{steps} answer loss {per_task_ce} lm {lm.item():.3f}"
                f"{recall_log} ({time.time() - t0:.0f}s)"
            )
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            acc = accuracy(logits_fn, view, n=eval_n)
            log("held-out " + " ".join(f"{k}={v['accuracy']:.3f}" for k, v in acc.items()))
            model.train()
            if checkpoint:  # a run cut short still leaves its latest evaluated weights
                run = {"steps": steps, "stopped": step + 1, "until_pass": until_pass}
                run |= {"seed": seed, "batch_size": batch_size, "wall": time.time() - t0}
                run |= {"lm_weight": lm_weight, "lr": lr, "warmup": warmup, "out": str(out)}
                run |= {"recall_weight": recall_weight, "recall_units": recall_units}
                _write(out, model, config, toy_vocabulary(), tokenizer, acc, run)
            if until_pass and passes(acc):
                log(f"all thresholds hold at step {step + 1}: stopping (--until-pass)")
                break
    stopped = step + 1
    model.eval()
    acc = accuracy(logits_fn, view, n=eval_n)
    wall = time.time() - t0
    log("final held-out " + " ".join(f"{k}={v['accuracy']:.3f}" for k, v in acc.items()))
    run = {"steps": steps, "stopped": stopped, "until_pass": until_pass, "seed": seed}
    run |= {"batch_size": batch_size, "wall": wall, "lm_weight": lm_weight, "lr": lr}
    run |= {"warmup": warmup, "out": str(out), "recall_weight": recall_weight}
    run |= {"recall_units": recall_units}
    _write(out, model, config, toy_vocabulary(), tokenizer, acc, run)
    return acc


def model_config(
    arch: str, vocab_size: int, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float
) -> dict:
    """config.json of a toy model; `model_type` names the Hugging Face class that builds it."""
    if arch == "gpt2":
        return dict(
            ARCH, vocab_size=vocab_size, n_embd=d_model, n_head=n_heads, n_inner=4 * d_model
        )
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": rope_theta}
        return dict(LLAMA_ARCH, vocab_size=vocab_size, hidden_size=d_model,
                    intermediate_size=4 * d_model, num_attention_heads=n_heads,
                    num_key_value_heads=n_kv_heads, rope_parameters=rope)  # fmt: skip
    raise ValueError(f"--arch {arch}: choose gpt2 or llama")


def passes(acc: dict) -> bool:
    return all(acc[k]["accuracy"] >= t for k, t in THRESHOLDS.items())


def _write(out: Path, model, config, words, tokenizer, acc, run):
    from safetensors.torch import save_file

    from actstore.model.tokenizer import SPECIAL_TOKENS

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    vocab = SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS]
    assert len(vocab) == config["vocab_size"] == len(tokenizer.get_vocab())
    (out / "vocab.json").write_text("[\n" + ",\n".join(json.dumps(w) for w in vocab) + "\n]\n")
    (out / "CARD.md").write_text(card(config, acc, run))


def card(config, acc, run) -> str:
    rows = "\n".join(
        f"| {k} | {v['accuracy'] * 100:.1f}% | {v['logit_diff']:.2f} | {THRESHOLDS[k] * 100:.0f}% |"
        for k, v in acc.items()
    )
    from actstore.model.adapter import toy_config
    from actstore.model.architecture import from_hf_config

    name = Path(run["out"]).name
    llama = config["model_type"] == "llama"
    a = from_hf_config(toy_config(config).to_dict())
    d_model, n_heads, kv, base = a.d_model, a.n_heads, a.n_kv_heads, a.rotary_base
    cmd = (
        f"python -m tools.train_toy --out {run['out']} --arch {config['model_type']} "
        f"--steps {run['steps']} --seed {run['seed']} --lr {run['lr']:g} "
        f"--warmup {run['warmup']} --lm-weight {run['lm_weight']:g} --d-model {d_model} "
        f"--n-heads {n_heads}"
        + (f" --n-kv-heads {kv}" if llama else "")
        + (f" --rope-theta {base:g}" if llama else "")
        + (" --attention-bias" if config.get("attention_bias") else "")
        + (
            f" --recall-weight {run['recall_weight']:g} --recall-units {run['recall_units']}"
            if run.get("recall_weight")
            else ""
        )
        + (" --until-pass" if run["until_pass"] else "")
    )
    stop = (
        f"stopped at step {run['stopped']} of {run['steps']}, at the first evaluation (every "
        "250 steps) where every task met its threshold (`--until-pass`)"
        if run["stopped"] < run["steps"]
        else f"{run['steps']} steps"
    )
    weights = ", ".join(f"{k} x{TASK_WEIGHTS.get(k, 1)}" for k in THRESHOLDS)
    recall = (
        f""" Each batch also holds {run["recall_units"]} units of
associative-recall rows, scored with weight {run["recall_weight"]:g}: `<|bos|>`,
{RECALL_CONTEXT[0]} to {RECALL_CONTEXT[1]} distinct random words of the vocabulary, then
{RECALL_QUERIES} of those words each followed by the word after it in the context, only those
followers scored. They teach the induction step (find the earlier occurrence, copy the word
after it) at distances that vary row by row, the step Colored Objects needs and that rotary
positions, with no absolute position to key on, otherwise form slowly."""
        if run.get("recall_weight")
        else ""
    )
    if llama:
        bias = "q/k/v/o biases, no MLP biases" if config["attention_bias"] else "no biases"
        kind = "a small Llama"
        architecture = f"""Llama (Hugging Face `LlamaForCausalLM`, loaded through TransformerLens'
`TransformerBridge`): {a.n_layers} layers, d_model {d_model}, {n_heads} query
heads sharing {kv} key/value heads (grouped-query attention, d_head {a.d_head}),
RMSNorm before each sublayer and at the end, rotary positions (base {base:g}, no learned
positions), SwiGLU MLP (d_mlp {a.d_mlp}), {bias},
{a.n_ctx} positions"""
    else:
        kind = "a small GPT-2"
        architecture = f"""GPT-2 (Hugging Face `GPT2LMHeadModel`, loaded through TransformerLens'
`TransformerBridge`): {a.n_layers} layers, d_model {d_model}, {n_heads} heads (d_head
{a.d_head}), d_mlp {a.d_mlp}, {a.n_ctx} positions"""
    return f"""# Model card: `{name}`

An actstore built-in model: {kind} trained by `tools/train_toy.py` on the clean
prompts of actstore's five tasks in their toy (word-level) phrasing, so that it really solves them
and has real circuits to find. Not a language model: it knows only the task vocabulary.

## Architecture
{architecture}, vocabulary {a.d_vocab} words (word-level tokenizer with a Whitespace
pre-tokenizer, so punctuation is its own token; `<|bos|>`, `<|pad|>`, `<|unk|>` first), tied
embeddings, float32 safetensors.

## Training data (toy phrasing per task)
Every prompt starts with `<|bos|>`. Loss: cross-entropy on the answer token after the prompt,
plus a smaller next-token loss over the whole clean prompt and answer (corrupted prompts are
never trained on). Mixture: every batch holds batch_size // 5 prompts per task and weight unit
({weights}).{recall} A fixed 10% of prompt
texts (crc32 of the text mod 10 == 0) is never trained on; accuracy is measured on those,
freshly generated with a different seed ({EVAL_SEED}).

- ioi: `When Mary and John went to the store , John gave a drink to` -> `Mary` (4 templates,
  ABBA and BABA). Corrupted (ABC): three other names; wrong answer: the subject `John`.
- colored-objects: `On the table I see pen red , book blue and cup green . The book` -> `blue`
  (an induction lookup: find the earlier `book`, copy the word after it). Corrupted: asks
  another object of the list, `... The cup` -> `green`, the wrong answer.
- greater-than: `The war lasted from the year 17 32 to the year 17` -> a year in 33..99 (years
  are two two-digit words). Corrupted: start year `01`; wrong answer: the start year `32`.
- sva: `The keys near the door` -> `are` (5 templates, the attractor's number random).
  Corrupted: the subject's number flipped (`The key near the door` -> `is`).
- capital-country: `The capital of France is` -> `Paris` (6 context templates, 16 facts).
  Corrupted: another country; wrong answer: its capital.

Real tokenizers get the natural phrasing instead (BIG-bench's "What color is the book? Answer:",
"1732", punctuation attached); the toy model was trained only on the toy phrasing above.
Capital-country is pure fact recall: its held-out prompts are the same 16 facts in context
templates that did not carry that country in training.

## Training
{stop}; batch size {run["batch_size"]} (weighted as above), AdamW (lr {run["lr"]:g}, linear
warmup over {run["warmup"]} steps, cosine decay over {run["steps"]} steps to 10%), answer
loss + {run["lm_weight"]:g} x next-token loss, seed {run["seed"]}, one torch thread;
{run["wall"] / 60:.1f} minutes wall on a CPU shared with other jobs. Command (from the
repository root):

    {cmd}

## Held-out accuracy (clean logit difference > 0, 200 fresh prompts per task)

| task | accuracy | mean logit diff | required |
|---|---|---|---|
{rows}
"""


def command_line() -> argparse.ArgumentParser:
    """The command's options; their defaults are train()'s, which the shipped toy's card
    command repeats (tests check they agree)."""
    import argparse
    import inspect

    default = {k: v.default for k, v in inspect.signature(train).parameters.items()}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="actstore/model/builtin/toy")
    parser.add_argument("--steps", type=int, default=default["steps"])
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.add_argument("--batch-size", type=int, default=default["batch_size"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=default["lr"])
    parser.add_argument("--d-model", type=int, default=default["d_model"])
    parser.add_argument("--arch", choices=("gpt2", "llama"), default=default["arch"])
    parser.add_argument("--n-heads", type=int, default=default["n_heads"])
    parser.add_argument("--n-kv-heads", type=int, default=default["n_kv_heads"],
                        help="llama: key/value heads")  # fmt: skip
    parser.add_argument("--rope-theta", type=float, default=default["rope_theta"],
                        help="llama: rotary base")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=default["warmup_steps"],
                        help="linear warmup steps")  # fmt: skip
    parser.add_argument("--attention-bias", action="store_true", help="llama: q/k/v/o biases")
    parser.add_argument("--lm-weight", type=float, default=default["lm_weight"])
    parser.add_argument(
        "--recall-weight",
        type=float,
        default=default["recall_weight"],
        help="weight of the associative-recall (induction) rows' loss; 0: none",
    )
    parser.add_argument(
        "--recall-units", type=int, default=default["recall_units"],
        help="associative-recall rows, in batch units",
    )  # fmt: skip
    parser.add_argument("--checkpoint", action="store_true", help="write the model at each eval")
    parser.add_argument(
        "--until-pass",
        action="store_true",
        help="stop at the first evaluation where every task meets its accuracy threshold",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    acc = train(
        args.out,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        eval_every=250 if args.until_pass else 500,
        until_pass=args.until_pass,
        lr=args.lr,
        lm_weight=args.lm_weight,
        checkpoint=args.checkpoint,
        d_model=args.d_model,
        arch=args.arch,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        rope_theta=args.rope_theta,
        warmup_steps=args.warmup,
        attention_bias=args.attention_bias,
        recall_weight=args.recall_weight,
        recall_units=args.recall_units,
    )
    failing = [k for k, v in acc.items() if v["accuracy"] < THRESHOLDS[k]]
    if failing:
        print(f"below threshold: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
