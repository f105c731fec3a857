"""Country-capital fact recall (Meng et al. 2022 style).

Clean:     "The capital of France is" -> " Paris"
Corrupted: "The capital of Japan is"  -> " Tokyo", the wrong answer
The corrupting country has the clean country's token length. Several context templates carry the
same facts; the toy models learn the facts, so held-out prompts differ from training prompts in
template (and pairing), never in the facts themselves.
Roles: `CapitalCountry.roles`.
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

FACTS = [
    ("France", "Paris"), ("England", "London"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Norway", "Oslo"),
]  # fmt: skip
TOY = [
    "The capital of {C} is",
    "I know that the capital of {C} is",
    "We went to see the capital of {C} , which is",
    "The capital city of {C} is",
    "Everyone says the capital of {C} is",
    "In the news , the capital of {C} is",
]
NATURAL = [t.replace(" ,", ",") for t in TOY]


class CapitalCountry:
    name = "capital-country"
    description = "capital city of a country (fact recall); corruption swaps the country"
    roles = {
        "COUNTRY": "the country's last token",
        "END": "the final token, where the capital is predicted",
    }

    def vocabulary(self) -> list[str]:
        return template_words(*TOY) + [w for fact in FACTS for w in fact]

    def generate(self, n: int, seed: int, model: Tokenizes) -> list[PromptPair]:
        from ingest.tasks.base import is_word_level

        rng = rng_for(seed, self.name)
        templates = TOY if is_word_level(model) else NATURAL
        facts = [(c, k) for c, k in FACTS if n_tokens(answer_text(k, model), model) == 1]
        by_len: dict[int, list[tuple[str, str]]] = {}
        for c, k in facts:
            by_len.setdefault(n_tokens(" " + c, model), []).append((c, k))
        facts = max(by_len.values(), key=len) if by_len else []
        if len(facts) < 2:
            raise TaskValidationError(
                "task capital-country: fewer than 2 countries with single-token capitals and "
                "equal token lengths for this tokenizer"
            )
        pairs = []
        for _ in range(n):
            t = rng.randrange(len(templates))
            (country, capital), (other, other_capital) = rng.sample(facts, 2)
            clean, spans = fill(templates[t], C=country)
            pairs.append(
                PromptPair(
                    clean=clean,
                    corrupted=templates[t].format(C=other),
                    answer=answer_text(capital, model),
                    wrong_answer=answer_text(other_capital, model),
                    subject_words=(country,),
                    group=f"t{t}",
                    meta={"country": country, "corrupt_country": other, "template": t},
                    roles=(role("COUNTRY", spans["C"][0]),),
                )
            )
        return pairs
