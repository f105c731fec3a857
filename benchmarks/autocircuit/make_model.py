"""A random GPT-2 model of any shape with a word-level tokenizer, as a Hugging Face directory, plus
N IOI prompts of one template in the AutoCircuit JSON format (which actstore also ingests).

The defaults are GPT-2-small's shape (12 layers, d_model 768, 12 heads, vocab 50257), seed 3 and
64 prompts. The first N prompts do not depend on --n (one RNG stream).

Usage: python make_model.py OUTDIR PROMPTS.json [--layers 4 --d-model 256 --heads 8 --n 16]
Run it with the AutoCircuit venv (transformers 4.44): its files load in transformers 5 too.
"""

import argparse
import json
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("prompts")
ap.add_argument("--layers", type=int, default=12)
ap.add_argument("--d-model", type=int, default=768)
ap.add_argument("--heads", type=int, default=12)
ap.add_argument("--vocab", type=int, default=50257)
ap.add_argument("--n", type=int, default=64)
ap.add_argument("--seed", type=int, default=3)
a = ap.parse_args()

R = random.Random(a.seed)
torch.manual_seed(a.seed)
names = "Ada Ben Cleo Dov Eli Fay Gus Hal Ivy Jon Kim Lea Max Ned Oda Pia".split()
words = "When and went to the shop , gave a book".split()
base = ["<|bos|>", "<|pad|>", "<|unk|>"] + sorted(set(names + words))
vocab = {w: i for i, w in enumerate(base + [f"w{i}" for i in range(a.vocab - len(base))])}
tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(
    tokenizer_object=tk,
    bos_token="<|bos|>",
    eos_token="<|bos|>",
    pad_token="<|pad|>",
    unk_token="<|unk|>",
    name_or_path="gpt2-small-shape",
    add_bos_token=True,
)
cfg = GPT2Config(
    n_layer=a.layers,
    n_embd=a.d_model,
    n_head=a.heads,
    vocab_size=a.vocab,
    n_positions=64,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)
GPT2LMHeadModel(cfg).save_pretrained(a.out)
tok.save_pretrained(a.out)
ps = []
for _ in range(a.n):
    x, y, z = R.sample(names, 3)
    ps.append(
        {
            "clean": f"When {x} and {y} went to the shop , {y} gave a book to",
            "corrupt": f"When {x} and {y} went to the shop , {z} gave a book to",
            "answers": [f" {x}"],
            "wrong_answers": [f" {y}"],
        }
    )
json.dump({"prompts": ps}, open(a.prompts, "w"))
print(f"wrote {a.out} ({a.layers} layers, d_model {a.d_model}, {a.heads} heads) and {a.n} prompts")
