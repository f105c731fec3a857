"""Sender and receiver specs of `actstore path`, parsed and checked without torch.

Senders: `a{L}.h{H}` (a head's output), `a{L}.*` (every head of layer L), `m{L}` (an MLP's
output), `all` (every head and MLP), comma-separated. Receivers, comma-separated, each patched
on its own (one row per sender and receiver): `a{L}.h{H}:q|k|v` (one head's query, key or value
input), `a{L}.*:q` (every head of layer L, each on its own), `a*.*:q` (every head after the
sender), `m{L}` (an MLP's input), `logits` (the sender's direct effect on the output). Receivers
joined by `+` (`a9.h6:q+a9.h9:q`) are patched together, as one receiver.

A sender reaches a receiver when the receiver reads its output: a head at layer l feeds the heads
of later layers, the MLP of its own layer (not under parallel attention and MLP) and of later
layers, and the logits; an MLP at layer l feeds everything in later layers and the logits. A
pair named explicitly that does not reach is refused ("receiver before sender"); pairs that a
wildcard or `all` produces and that do not reach are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from actstore.core.errors import UsageError
from actstore.core.names import HEAD_NAME, LOGITS, MLP_NAME, head_node, mlp_node
from actstore.core.store import Store
from actstore.model.architecture import Architecture

QKV = ("q", "k", "v")
_LAYER_HEADS = re.compile(r"^a(\d+)\.\*$")
_RECEIVER_HEAD = re.compile(r"^a(\d+|\*)\.(?:h(\d+)|\*):([qkv])$")


@dataclass(frozen=True)
class Node:
    """A sender or a receiver's member: a head (kind 'a'), an MLP ('m') or the logits ('logits');
    `qkv` is the head input a receiver patches."""

    kind: str
    layer: int = -1
    head: int = -1
    qkv: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "a":
            return head_node(self.layer, self.head)
        return mlp_node(self.layer) if self.kind == "m" else LOGITS


@dataclass(frozen=True)
class Receiver:
    """Receiver members patched together; `explicit` when the user named every member."""

    members: tuple[Node, ...]
    explicit: bool

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.members)

    @property
    def qkv(self) -> str | None:
        letters = {m.qkv for m in self.members}
        return letters.pop() if len(letters) == 1 else None

    @property
    def label(self) -> str:
        """Its name with each head's input letter: what errors show."""
        return "+".join(m.name + (f":{m.qkv}" if m.qkv else "") for m in self.members)


@dataclass(frozen=True)
class Shape:
    """What the specs are checked against: the model's layers, heads and block layout."""

    n_layers: int
    n_heads: int
    parallel: bool


def parse_senders(text: str, shape: Shape) -> tuple[list[Node], bool]:
    """(senders in graph order, whether all were named explicitly)."""
    out: list[Node] = []
    explicit = True
    for item in _items(text, "--senders"):
        if item == "all":
            explicit = False
            for layer in range(shape.n_layers):
                out += [Node("a", layer, h) for h in range(shape.n_heads)] + [Node("m", layer)]
        elif m := HEAD_NAME.match(item):
            out.append(_head(shape, int(m[1]), int(m[2]), item))
        elif m := _LAYER_HEADS.match(item):
            explicit = False
            layer = _layer(shape, int(m[1]), item)
            out += [Node("a", layer, h) for h in range(shape.n_heads)]
        elif m := MLP_NAME.match(item):
            out.append(Node("m", _layer(shape, int(m[1]), item)))
        else:
            raise UsageError(f"--senders {item}: give a{{L}}.h{{H}}, a{{L}}.*, m{{L}} or all")
    return sorted(set(out), key=_order), explicit


def parse_heads(text: str, shape: Shape) -> list[Node]:
    """Heads named `a{L}.h{H}` or `a{L}.*`, comma-separated, in graph order."""
    out: list[Node] = []
    for item in _items(text, "--heads"):
        if m := HEAD_NAME.match(item):
            out.append(_head(shape, int(m[1]), int(m[2]), item))
        elif m := _LAYER_HEADS.match(item):
            layer = _layer(shape, int(m[1]), item)
            out += [Node("a", layer, h) for h in range(shape.n_heads)]
        else:
            raise UsageError(f"--heads {item}: give heads as a{{L}}.h{{H}} or a{{L}}.*")
    return sorted(set(out), key=_order)


def run_shape(store: Store, run: int) -> Shape:
    """The shape of the run's model as the catalog records it (no model loaded)."""
    with store.reading():
        info = store.run(run)
        rows = store._trusted_query(
            "SELECT n_layers, n_heads, architecture FROM models WHERE model = ?", [info["model"]]
        )
    if not rows.height:
        raise UsageError(f"run {run}: its model {info['model']!r} is not recorded in the store")
    arch = rows["architecture"][0]
    parallel = arch is not None and Architecture.from_json(arch).parallel
    return Shape(int(rows["n_layers"][0]), int(rows["n_heads"][0]), parallel)


def parse_receivers(text: str, shape: Shape) -> list[Receiver]:
    """Receivers in the order given, wildcards expanded (each member its own receiver)."""
    out: list[Receiver] = []
    for item in _items(text, "--receivers"):
        parts = item.split("+")
        if len(parts) > 1:
            members = [_one_receiver(p, shape) for p in parts]
            if any(len(m) != 1 for m in members):
                raise UsageError(f"--receivers {item}: receivers joined by + take no wildcards")
            out.append(Receiver(tuple(m[0] for m in members), True))
            continue
        nodes = _one_receiver(item, shape)
        out += [Receiver((n,), "*" not in item) for n in nodes]
    return out


def reaches(sender: Node, receiver: Node, parallel: bool) -> bool:
    """Whether the receiver reads the sender's output (the module docstring's rule)."""
    if receiver.kind == "logits":
        return True
    if receiver.kind == "m" and sender.kind == "a" and not parallel:
        return receiver.layer >= sender.layer
    return receiver.layer > sender.layer


def pairs(
    senders: list[Node], explicit: bool, receivers: list[Receiver], parallel: bool
) -> list[tuple[Node, Receiver]]:
    """Every (sender, receiver) to measure; an explicit pair that does not reach is refused."""
    out = []
    for r in receivers:
        for s in senders:
            if all(reaches(s, m, parallel) for m in r.members):
                out.append((s, r))
            elif explicit and r.explicit:
                raise UsageError(
                    f"receiver {r.label} comes before sender {s.name}: it cannot read the "
                    "sender's output; name a receiver in a later layer"
                )
    if not out:
        raise UsageError("no receiver reads any sender's output; name receivers after the senders")
    return out


def recorded_pairs(params: dict, shape: Shape) -> list[tuple[Node, Receiver]]:
    """The pairs of a recorded query's checked senders and receivers: every one that reaches."""
    sent, _ = parse_senders(",".join(params["senders"]), shape)
    return pairs(sent, False, parse_receivers(",".join(params["receivers"]), shape), shape.parallel)


def _items(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{option} is empty: name at least one node")
    return items


def _layer(shape: Shape, layer: int, item: str) -> int:
    if not 0 <= layer < shape.n_layers:
        raise UsageError(f"{item}: no layer {layer}; the model has layers 0..{shape.n_layers - 1}")
    return layer


def _head(shape: Shape, layer: int, head: int, item: str) -> Node:
    _layer(shape, layer, item)
    if not 0 <= head < shape.n_heads:
        raise UsageError(f"{item}: no head {head}; the model has heads 0..{shape.n_heads - 1}")
    return Node("a", layer, head)


def _one_receiver(item: str, shape: Shape) -> list[Node]:
    if item == LOGITS:
        return [Node("logits")]
    if m := MLP_NAME.match(item):
        return [Node("m", _layer(shape, int(m[1]), item))]
    m = _RECEIVER_HEAD.match(item)
    if m is None:
        raise UsageError(
            f"--receivers {item}: give a{{L}}.h{{H}}:q|k|v, a{{L}}.*:q, a*.*:q, m{{L}} or logits"
        )
    layer, head, qkv = m[1], m[2], m[3]
    if layer == "*" and head is not None:
        raise UsageError(f"--receivers {item}: a layer wildcard takes every head (a*.*:{qkv})")
    layers = range(shape.n_layers) if layer == "*" else [_layer(shape, int(layer), item)]
    if head is not None:
        return [Node("a", h.layer, h.head, qkv) for h in [_head(shape, layers[0], int(head), item)]]
    return [Node("a", la, h, qkv) for la in layers for h in range(shape.n_heads)]


def _order(n: Node) -> tuple[int, int]:
    """Graph order: a layer's heads, then its MLP."""
    return (n.layer, n.head if n.kind == "a" else 1 << 30)
