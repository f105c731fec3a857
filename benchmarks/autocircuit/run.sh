#!/usr/bin/env bash
# actstore beside AutoCircuit 1.0.1: the same random GPT-2, IOI prompts, corruption and edges.
#
#   bash benchmarks/autocircuit/run.sh setup      # AutoCircuit's venv (pinned), once; not timed
#   bash benchmarks/autocircuit/run.sh small      # 4 layers x d_model 256 x 8 heads, 16 prompts
#   bash benchmarks/autocircuit/run.sh gpt2       # GPT-2-small shape (12 x 768 x 12), 64 prompts,
#                                                 # batches of 32 (~13 GB RAM on AutoCircuit's side)
#   bash benchmarks/autocircuit/run.sh gpt2 16    # GPT-2-small shape, the first 16 prompts, one batch
#   B=16 bash benchmarks/autocircuit/run.sh gpt2  # another batch size (N a multiple of B)
#   EXTRA=--no-api bash …/run.sh small            # leave out actstore's one-process API side
#   EXTRA=--no-extras bash …/run.sh gpt2          # skip AutoCircuit's untimed extras
#   EXTRA="--ig-steps 5" bash …/run.sh small      # EAP-IG both sides too (not like for like)
#   B=64 TAG=_tail EXTRA=--ac-tail-divergence bash …/run.sh gpt2  # AutoCircuit's KV-cached
#                                                 # prefix (its loader's default; one batch only)
#
# Everything it makes goes to $PEERS_DIR (default $TMPDIR/actstore-peers, outside the checkout):
# AutoCircuit's venv, the models, the results in results/<name><TAG>/{summary.txt,results.json,
# commands.log}. actstore runs from this checkout's .venv (`make setup`). Time on an idle
# machine: the load average is recorded at the start and end of each side.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
P=${PEERS_DIR:-${TMPDIR:-/tmp}/actstore-peers}
mkdir -p "$P"
AC_PY=$P/ac-venv/bin/python

setup() {
  [ -x "$REPO/.venv/bin/actstore" ] || make -C "$REPO" setup
  [ -x "$P/ac-venv/bin/python" ] || python3 -m venv "$P/ac-venv"
  # Exactly the versions the figures were measured with (ac-venv-freeze.txt). AutoCircuit's wheel
  # declares transformer-lens>=1.13 with no upper bound, so a plain `pip install auto-circuit`
  # pulls TransformerLens 4, which removed HookedTransformer (auto_circuit fails on import), and
  # numpy 2 / pyarrow / jax releases that TL 2.4's stack cannot import; the freeze holds the
  # versions of AutoCircuit's own poetry.lock at tag v1.0.1 (transformer-lens 2.4.0,
  # transformers 4.44.2, numpy 1.26.4, …). torch is the 2.13.0 CPU build.
  # (pip freeze leaves setuptools out; torch 2.13 asks for setuptools>=77.0.3)
  "$AC_PY" -m pip install -q --no-deps -r "$HERE/ac-venv-freeze.txt" setuptools==84.2.1
  "$AC_PY" -m pip check
}

model() {  # NAME LAYERS D_MODEL HEADS N
  [ -f "$P/models/$1/model.safetensors" ] && [ -f "$P/data/$1.json" ] && return
  mkdir -p "$P/models" "$P/data"
  "$AC_PY" "$HERE/make_model.py" "$P/models/$1" "$P/data/$1.json" --layers "$2" \
    --d-model "$3" --heads "$4" --n "$5"
}

compare() {  # NAME DATASET BATCH EDGES
  [ -x "$AC_PY" ] || { echo "run 'bash $0 setup' first" >&2; exit 2; }
  local api=--api
  local extra=()
  for x in ${EXTRA:-}; do [ "$x" = --no-api ] && api= || extra+=("$x"); done
  ACTSTORE_MODEL_CACHE=$P/results/$1${TAG:-}/model-cache "$AC_PY" "$HERE/compare.py" \
    --model "$P/models/${1%%_*}" --dataset "$2" --workdir "$P/results/$1${TAG:-}" \
    --batch-size "$3" --edges "$4" $api ${extra[@]+"${extra[@]}"}
}

case "${1:-small}" in
  setup) setup ;;
  small)
    model small 4 256 8 16
    compare small "$P/data/small.json" 16 0,10,50,100,200,500,1000,all ;;
  gpt2)
    N=${2:-64}
    model gpt2 12 768 12 64
    DS=$P/data/gpt2.json
    if [ "$N" != 64 ]; then  # the first N prompts (one RNG stream: the same prompts)
      DS=$P/data/gpt2_$N.json
      "$AC_PY" -c "import json, sys; d = json.load(open(sys.argv[1])); d['prompts'] = \
d['prompts'][:int(sys.argv[3])]; json.dump(d, open(sys.argv[2], 'w'))" "$P/data/gpt2.json" "$DS" "$N"
    fi
    B=${B:-$(( N < 32 ? N : 32 ))}
    compare "gpt2_$N" "$DS" "$B" 0,10,50,100,500,1000,5000,10000,all ;;
  *) echo "usage: bash run.sh setup|small|gpt2 [N]" >&2; exit 2 ;;
esac
