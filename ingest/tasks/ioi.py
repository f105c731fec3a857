"""Indirect object identification (Wang et al. 2022) with the ABC corruption.

Clean:     "When Mary and John went to the store, John gave a drink to" -> " Mary" (IO), not " John"
Corrupted: "When Alice and Bob went to the store, Carol gave a drink to" (three unrelated names)
ABBA and BABA orders are both generated.
Roles (Wang et al.): `IOI.roles`.
"""

from __future__ import annotations

from ingest.tasks.base import (
    PromptPair,
    Tokenizes,
    answer_text,
    fill,
    rng_for,
    role,
    template_words,
)

NAMES = [
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "David", "Emma", "Paul",
    "Anna", "Mark", "Laura", "Peter", "Kate", "Daniel", "Lisa", "Michael", "Rachel", "Steven",
]  # fmt: skip
PLACES = ["store", "park", "school", "office", "garden", "station", "market", "library"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key", "bag", "card"]
TEMPLATES = [
    "When {A} and {B} went to the {PLACE} , {C} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE} , {C} handed a {OBJECT} to",
    "Then , {A} and {B} had a long day at the {PLACE} . {C} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE} , {C} gave a {OBJECT} to",
]
NATURAL = [t.replace(" ,", ",").replace(" .", ".") for t in TEMPLATES]


class IOI:
    name = "ioi"
    description = "indirect object identification, ABBA/BABA templates, ABC corruption"
    roles = {
        "IO": "the indirect object (the answer's token)",
        "S1": "the subject's first mention",
        "S1+1": "the token after S1",
        "S2": "the subject's second mention",
        "END": "the final token, where the indirect object is predicted",
    }

    def vocabulary(self) -> list[str]:
        return template_words(*TEMPLATES) + NAMES + PLACES + OBJECTS

    def generate(self, n: int, seed: int, model: Tokenizes) -> list[PromptPair]:
        from ingest.tasks.base import is_word_level

        rng = rng_for(seed, self.name)
        templates = TEMPLATES if is_word_level(model) else NATURAL
        pairs = []
        for i in range(n):
            t = rng.randrange(len(templates))
            io, s, a, b, c = rng.sample(NAMES, 5)
            place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
            order = "ABBA" if i % 2 == 0 else "BABA"
            first, second = (io, s) if order == "ABBA" else (s, io)
            words = {"PLACE": place, "OBJECT": obj}
            clean, spans = fill(templates[t], A=first, B=second, C=s, **words)
            corrupted = templates[t].format(A=a, B=b, C=c, **words)
            a_at, b_at = spans["A"][0], spans["B"][0]
            io_at, s_at = (a_at, b_at) if order == "ABBA" else (b_at, a_at)
            pairs.append(
                PromptPair(
                    clean=clean,
                    corrupted=corrupted,
                    answer=answer_text(io, model),
                    wrong_answer=answer_text(s, model),
                    subject_words=(first, second, s),
                    group=f"{order}:t{t}",
                    meta={"io": io, "s": s, "template": t, "order": order},
                    roles=(
                        role("IO", io_at),
                        role("S1", s_at),
                        role("S1+1", s_at, shift=1),
                        role("S2", spans["C"][0]),
                    ),
                )
            )
        return pairs
