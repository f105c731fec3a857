"""Greater-Than (Hanna, Liu & Variengien 2023).

Natural phrasing: "The war lasted from the year 1732 to the year 17" -> "33" (no leading space:
GPT-2 splits "1732" into "17" + "32", so the answer continues "17" directly). The answer is a
year YY' > YY drawn per pair; the wrong answer is the start year YY itself (not greater). Each
pair also carries Hanna et al.'s answer sets: every two-digit year above YY is correct, every
one at or below it incorrect (the `prob-diff` metric sums their probabilities).
Toy phrasing: the word-level tokenizer has two-digit tokens, so the years are written as two
words: "The war lasted from the year 17 32 to the year 17" -> "33".
STR corruption, as in Hanna et al.: the start year becomes "01" ("1701"), after which every
year is greater, so the logit difference of the clean answers falls to about 0.
Roles: `GreaterThan.roles`.
"""

from __future__ import annotations

from ingest.tasks.base import (
    PromptPair,
    TaskValidationError,
    Tokenizes,
    fill,
    is_word_level,
    rng_for,
    role,
    template_words,
)

NOUNS = [
    "war", "expedition", "reign", "siege", "drought", "famine", "voyage", "journey", "project",
    "dynasty", "strike", "conflict",
]  # fmt: skip
CENTURIES = [str(c) for c in range(11, 18)]
START_YEARS = [f"{y:02d}" for y in range(2, 99)]
TOY = "The {N} lasted from the year {XX} {YY} to the year {XX}"
NATURAL = "The {N} lasted from the year {XX}{YY} to the year {XX}"
CORRUPT_YY = "01"


def two_digit_words() -> list[str]:
    return [f"{y:02d}" for y in range(100)]


class GreaterThan:
    name = "greater-than"
    description = "end year greater than the start year (Hanna et al. 2023), '01' corruption"
    roles = {
        "XX": 'the start year\'s century ("17")',
        "YY": 'the start year\'s two digits ("32" of 1732)',
        "END": "the final token (the end year's century), where its digits are predicted",
    }

    def vocabulary(self) -> list[str]:
        return template_words(TOY) + NOUNS + CENTURIES + two_digit_words()

    def _start_years(self, model: Tokenizes, xx: str) -> list[str]:
        """Start years whose "XXYY" splits into the tokens of "XX" and "YY" (as in GPT-2)."""
        if is_word_level(model):
            return START_YEARS
        head = model.token_ids(f" {xx}")
        kept = [
            yy
            for yy in START_YEARS
            if model.token_ids(f" {xx}{yy}") == head + model.token_ids(yy)
            and len(model.token_ids(yy)) == 1
        ]
        if len(kept) < 10:
            raise TaskValidationError(
                f"task greater-than: this tokenizer does not split years like ' {xx}32' into "
                f"' {xx}' + '32'; the task needs two-digit year tokens"
            )
        return kept

    def _year_tokens(self, model: Tokenizes) -> list[str]:
        """The two-digit years that are one token where they continue a prompt."""
        if is_word_level(model):
            return two_digit_words()
        return [y for y in two_digit_words() if len(model.token_ids(y)) == 1]

    def generate(self, n: int, seed: int, model: Tokenizes) -> list[PromptPair]:
        rng = rng_for(seed, self.name)
        template = TOY if is_word_level(model) else NATURAL
        tokens = self._year_tokens(model)
        years: dict[str, list[str]] = {}
        pairs = []
        for _ in range(n):
            noun, xx = rng.choice(NOUNS), rng.choice(CENTURIES)
            if xx not in years:
                years[xx] = self._start_years(model, xx)
            yy = rng.choice(years[xx])
            answer = f"{rng.randrange(int(yy) + 1, 100):02d}"
            clean, spans = fill(template, N=noun, XX=xx, YY=yy)
            corrupted = template.format(N=noun, XX=xx, YY=CORRUPT_YY)
            pairs.append(
                PromptPair(
                    clean=clean,
                    corrupted=corrupted,
                    answer=answer,
                    wrong_answer=yy,
                    subject_words=(yy if is_word_level(model) else f"{xx}{yy}",),
                    group=f"century{xx}",
                    meta={"start_year": int(xx + yy), "yy": int(yy), "noun": noun},
                    answers=tuple(y for y in tokens if int(y) > int(yy)),
                    wrong_answers=tuple(y for y in tokens if int(y) <= int(yy)),
                    roles=(role("XX", spans["XX"][0]), role("YY", spans["YY"][0])),
                )
            )
        return pairs
