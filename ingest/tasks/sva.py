"""Subject-verb agreement (Linzen et al. 2016; Finlayson et al. 2021), with an attractor noun.

Clean:     "The keys near the cabinet" -> " are", not " is"
Corrupted: "The key near the cabinet"  -> " is" (the subject's number flipped, same noun)
The attractor noun has a number drawn independently of the subject's, so that a model must find
the subject, not the nearest noun. The phrasing has no punctuation: toy and natural are the same
words; only the answer's leading space differs.
Roles: `SVA.roles`. The prompt ends before the verb, so the verb's role is END: the position
where the model predicts it.
"""

from __future__ import annotations

from ingest.tasks.base import (
    PromptPair,
    TaskValidationError,
    Tokenizes,
    answer_text,
    fill,
    n_tokens,
    rng_for,
    role,
    template_words,
)

NOUNS = [
    ("author", "authors"), ("key", "keys"), ("dog", "dogs"), ("teacher", "teachers"),
    ("doctor", "doctors"), ("friend", "friends"), ("student", "students"), ("boy", "boys"),
    ("girl", "girls"), ("car", "cars"), ("farmer", "farmers"), ("pilot", "pilots"),
    ("painter", "painters"), ("cat", "cats"), ("lawyer", "lawyers"), ("table", "tables"),
    ("window", "windows"), ("door", "doors"), ("guard", "guards"), ("player", "players"),
]  # fmt: skip
TEMPLATES = [
    "The {S} near the {A}",
    "The {S} behind the {A}",
    "The {S} next to the {A}",
    "The {S} that the {A} saw",
    "The {S} that the {A} liked",
]
VERBS = ("is", "are")


class SVA:
    name = "sva"
    description = "subject-verb agreement across an attractor noun; corruption flips the number"
    roles = {
        "SUBJECT": "the subject noun",
        "ATTRACTOR": "the noun between subject and verb",
        "END": "the verb's position: the prompt ends before the verb, which is predicted here",
    }

    def vocabulary(self) -> list[str]:
        return template_words(*TEMPLATES) + [w for pair in NOUNS for w in pair] + list(VERBS)

    def generate(self, n: int, seed: int, model: Tokenizes) -> list[PromptPair]:
        rng = rng_for(seed, self.name)
        nouns = [(s, p) for s, p in NOUNS if n_tokens(" " + s, model) == n_tokens(" " + p, model)]
        for v in VERBS:
            if n_tokens(answer_text(v, model), model) != 1:
                raise TaskValidationError(f"task sva: the verb {v!r} is not one token here")
        if len(nouns) < 2:
            raise TaskValidationError(
                "task sva: too few nouns whose singular and plural have equal token length"
            )
        pairs = []
        for _ in range(n):
            t = rng.randrange(len(TEMPLATES))
            (s_sing, s_plur), (a_sing, a_plur) = rng.sample(nouns, 2)
            plural = rng.random() < 0.5
            attractor = a_plur if rng.random() < 0.5 else a_sing
            subj, flipped = (s_plur, s_sing) if plural else (s_sing, s_plur)
            verb, wrong = (VERBS[1], VERBS[0]) if plural else (VERBS[0], VERBS[1])
            clean, spans = fill(TEMPLATES[t], S=subj, A=attractor)
            pairs.append(
                PromptPair(
                    clean=clean,
                    corrupted=TEMPLATES[t].format(S=flipped, A=attractor),
                    answer=answer_text(verb, model),
                    wrong_answer=answer_text(wrong, model),
                    subject_words=(subj,),
                    group=f"{'plural' if plural else 'singular'}:t{t}",
                    meta={"plural": plural, "attractor": attractor, "template": t},
                    roles=(role("SUBJECT", spans["S"][0]), role("ATTRACTOR", spans["A"][0])),
                )
            )
        return pairs
