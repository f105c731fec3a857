"""Colored Objects (Ippolito & Callison-Burch; BIG-bench reasoning_about_colored_objects).

Natural phrasing (real tokenizers), as in BIG-bench and Merullo et al.:
    "On the table, I see a red pen, a blue book and a green cup. What color is the book? Answer:"
    -> " blue"
Toy phrasing (the built-in word-level models): each color right after its object, the prompt
ending on the asked object, so that a plain induction lookup solves it (find the earlier "book",
copy the word after it). A small toy stayed at chance on the BIG-bench order, and on "... the
book is blue ... . The book is", a two-token match:
    "On the table I see pen red , book blue and cup green . The book" -> "blue"
STR corruption asks about another object of the same list ("... The cup" -> "green"), which is
the wrong answer. Same list, one word swapped for another from the list: equal token length.
Roles: `ColoredObjects.roles`.
"""

from __future__ import annotations

from ingest.tasks.base import (
    PromptPair,
    Tokenizes,
    answer_text,
    fill,
    is_word_level,
    n_tokens,
    rng_for,
    role,
    single_token,
    template_words,
)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "pink"]
OBJECTS = [
    "pen", "book", "cup", "ball", "key", "box", "hat", "bag", "plate", "lamp", "chair", "clock",
    "phone", "shoe", "coin", "bottle",
]  # fmt: skip
PLACES = ["table", "desk", "floor", "shelf"]
TOY = "On the {P} I see {O0} {C0} , {O1} {C1} and {O2} {C2} . The {Q}"
NATURAL = (
    "On the {P}, I see a {C0} {O0}, a {C1} {O1} and a {C2} {O2}. What color is the {Q}? Answer:"
)
N_ITEMS = 3


class ColoredObjects:
    name = "colored-objects"
    description = "color of a named object among three (BIG-bench phrasing; toy: induction order)"
    roles = {
        "OBJECT": "the queried object in the list",
        "COLOR": "the queried object's colour (the answer's token)",
        "OTHER1": "the first of the other colours, in list order",
        "OTHER2": "the second of the other colours",
        "QUERY": "the object named by the question (toy phrasing: the final token, = END)",
        "END": "the final token, where the colour is predicted",
    }

    def vocabulary(self) -> list[str]:
        return template_words(TOY) + COLORS + OBJECTS + PLACES

    def generate(self, n: int, seed: int, model: Tokenizes) -> list[PromptPair]:
        rng = rng_for(seed, self.name)
        toy = is_word_level(model)
        template = TOY if toy else NATURAL
        colors = single_token(COLORS, model, self.name, least=N_ITEMS)
        # Objects that take equal token counts in the list, so swapping the asked one keeps length.
        by_len: dict[int, list[str]] = {}
        for o in OBJECTS:
            by_len.setdefault(n_tokens(" " + o, model), []).append(o)
        objects = max(by_len.values(), key=len)
        pairs = []
        for _ in range(n):
            cs = rng.sample(colors, N_ITEMS)
            os_ = rng.sample(objects, N_ITEMS)
            q, r = rng.sample(range(N_ITEMS), 2)
            place = rng.choice(PLACES)
            words = {f"C{i}": cs[i] for i in range(N_ITEMS)} | {
                f"O{i}": os_[i] for i in range(N_ITEMS)
            }
            clean, spans = fill(template, P=place, Q=os_[q], **words)
            corrupted = template.format(P=place, Q=os_[r], **words)
            others = [i for i in range(N_ITEMS) if i != q]
            pairs.append(
                PromptPair(
                    clean=clean,
                    corrupted=corrupted,
                    answer=answer_text(cs[q], model),
                    wrong_answer=answer_text(cs[r], model),
                    subject_words=(os_[q],),
                    group=f"q{q}",
                    meta={"object": os_[q], "color": cs[q], "corrupt_object": os_[r]},
                    roles=(
                        role("OBJECT", spans[f"O{q}"][0]),
                        role("COLOR", spans[f"C{q}"][0]),
                        *(role(f"OTHER{k}", spans[f"C{i}"][0]) for k, i in enumerate(others, 1)),
                        role("QUERY", spans["Q"][0]),
                    ),
                )
            )
        return pairs
