"""A fact set no model has seen: fictional software packages and their attributes, generated from a seed.

What a retrieval-versus-fine-tuning experiment needs from its facts:

- **Unseen.** Every entity is a made-up package name built from syllables (`vorantel`, `quibrastix`),
  and every value is drawn at random: a port, an author (a first and a last name from two lists),
  a first-release year and a default timeout. No pre-training corpus states them, so a model that
  answers right learned it from the fine-tuning data or read it from the prompt.
- **Hard to guess.** Each attribute has dozens to thousands of possible values (ports 1024-9999,
  900 author names, 33 years, timeouts 3-240 s): a model that answers from a prior, not the fact,
  scores near zero.
- **Fits a code model.** Ports, timeouts and release years are what a model trained on the Python
  standard library has read about, in the words its documentation uses.
- **Paraphrases held out.** A fact carries its statement (the passage a retriever returns, and a
  fine-tuning text), the question in its *original phrasing* (the wording fine-tuning trains on) and
  two *paraphrased* questions worded differently. Paraphrase templates appear in no
  training text of any arm: they measure whether a model learned the fact or the sentence.
- **Disjoint sets.** `make_fact_sets` draws the evaluated facts and a second set (to teach a model
  to read passages, by example) from one stream of distinct names, so no entity is in both.

One entity has one fact per attribute, so its four statements are one another's near-miss
distractors under retrieval (the same name, another attribute).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# Each attribute: how its value is drawn, how a fact about it is stated, its question in the original
# phrasing, and the held-out paraphrases. `{e}` is the entity, `{v}` the value.
ATTRIBUTES: dict[str, dict[str, Any]] = {
    "port": {
        "statement": "The {e} server listens on port {v} by default.",
        "question": "What port does the {e} server listen on by default?",
        "paraphrases": ("Which TCP port does {e} bind when no port is configured?",
                        "If you start {e} with no options, which port number does it use?"),
    },
    "author": {
        "statement": "{e} was written by {v}.",
        "question": "Who wrote {e}?",
        "paraphrases": ("Name the developer who created the {e} package.",
                        "{e} is the work of which programmer?"),
    },
    "year": {
        "statement": "{e} was first released in {v}.",
        "question": "In what year was {e} first released?",
        "paraphrases": ("When did the initial release of {e} come out (the year)?",
                        "Which year saw version one of {e} published?"),
    },
    "timeout": {
        "statement": "The default timeout of {e} is {v} seconds.",
        "question": "What is the default timeout of {e}, in seconds?",
        "paraphrases": ("How many seconds does {e} wait before a request gives up?",
                        "Out of the box, after how long (in seconds) does a call to {e} time out?"),
    },
}

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "pl", "qu", "r", "s", "st", "t",
           "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "x", "s", "m")
_FIRST = ("Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kalani", "Lucia",
          "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Vera", "Wanjiru", "Xavier",
          "Yara", "Zoltan", "Amara", "Bjorn", "Carmen", "Dario")
_LAST = ("Abernathy", "Brandvold", "Castellanos", "Drummond", "Eklund", "Ferreira", "Gallagher", "Halvorsen",
         "Iwasaki", "Jablonski", "Kowalczyk", "Lindqvist", "Mbeki", "Nakamura", "Okonkwo", "Petrovic", "Quintero",
         "Rasmussen", "Szabo", "Tanaka", "Ulrich", "Vasquez", "Whitfield", "Xu", "Yilmaz", "Zielinski", "Achebe",
         "Bergstrom", "Cardoso", "Delacroix")


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str  # a key of ATTRIBUTES
    answer: str
    statement: str  # the passage: what fine-tuning reads and a retriever returns
    question: str  # the original phrasing, the one training sees
    paraphrases: tuple[str, ...]  # held out: in no training text

    @property
    def id(self) -> str:
        return f"{self.entity}.{self.attribute}"


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.randint(2, 3)))


def _value(attribute: str, rng: random.Random) -> str:
    if attribute == "port":
        return str(rng.randint(1024, 9999))
    if attribute == "author":
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    if attribute == "year":
        return str(rng.randint(1991, 2023))
    return str(rng.randint(3, 240))  # timeout


def entity_facts(entity: str, rng: random.Random) -> list[Fact]:
    """One fact per attribute about `entity`, its values drawn from `rng`."""
    facts = []
    for attribute, spec in ATTRIBUTES.items():
        v = _value(attribute, rng)
        facts.append(Fact(entity, attribute, v, spec["statement"].format(e=entity, v=v),
                          spec["question"].format(e=entity), tuple(p.format(e=entity) for p in spec["paraphrases"])))
    return facts


def make_fact_sets(n_entities: int, n_reading_entities: int, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """(the evaluated facts, the facts that teach reading), about `n_entities` and `n_reading_entities`
    distinct fictional packages; the same seed gives the same sets."""
    rng = random.Random(f"athanor-facts-{seed}")
    seen: set[str] = set()

    def draw(n: int) -> list[Fact]:
        facts: list[Fact] = []
        while len(facts) < n * len(ATTRIBUTES):
            name = _name(rng)
            if name not in seen:
                seen.add(name)
                facts += entity_facts(name, rng)
        return facts

    # The evaluated facts are drawn first, so how many reading facts follow does not change them.
    return draw(n_entities), draw(n_reading_entities)
