"""The built-in `skills` source: multiple-choice questions a tiny LM can learn, in six skills.

The tiny world's analog of ARC and its sources. The bundled real QA sets (`qa`) are science and
commonsense exams that a 1-10M-parameter model cannot answer above chance; these are templated
questions whose answers follow from the question itself (read, compare, count on) or from a small
fixed body of knowledge (which word is a fruit; what colour snow is). A base pretrained briefly on
them answers above chance, and a LoRA on a skill's questions moves its accuracy. Every question
has four choices; chance is 0.25. One example of each set (`source` is the set name):

    arithmetic  What is 23 plus 9?                                     32 | 31 | 42 | 33
    compare     Which number is the largest: 34, 81, 27 or 55?         34 | 81 | 27 | 55
    lookup      Ann has a cup. Bob has a hat. Eve has a key. What does Bob have?   cup | hat | key | map
    sequence    What comes after 347?                                  348 | 346 | 357 | 349
    category    Which one is a fruit: lamp, pear, wolf or drum?        lamp | pear | wolf | drum
    property    What colour is snow: red, white, green or brown?       red | white | green | brown

Generation is a pure function of (set name, `GENERATOR_VERSION`): set s's examples come from
`random.Random(f"skills-v{version}:{s}")`, drawn until `EXAMPLES_PER_SET` distinct question texts
exist (a repeated question is skipped, so no question text appears twice in a set). Example i of
set s has id "{s}-{i:05d}".

Splits: each example goes to one of `SPLITS` by a hash of its question text (`split_of`), so
the split of a question never depends on which sets are chosen or on generation order, and a
question text is in one split only. "pretrain" (77.5 %) is what `tiny:qa-lm` pretrains on,
"train" (15 %) is what LoRAs finetune on, "validation" (3 %) and "test" (4.5 %: ≈ 90 per set,
≈ 540 in all) are for the scorers. Knowledge questions (category, property) ask about the same
small vocabulary in every split, with other distractors and orders, as a science exam's test asks
about facts its training questions also use; the procedural ones (arithmetic, compare, lookup,
sequence) have thousands of distinct instances.

Benchmarks name the sets: `skills:all`, `skills:compare`, `skills:lookup+sequence`.
Generation is cached per process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence

from pipeline.data.base import DataSourceError, QAExample, hash_bucket, split_of_bucket

GENERATOR_VERSION = 1  # changing a template or word list must bump it (it is in the fingerprint)
EXAMPLES_PER_SET = 2000
# Per-mille shares of every set, by a hash of the question text; they sum to 1000.
SPLITS: tuple[tuple[str, int], ...] = (("pretrain", 775), ("train", 150), ("validation", 30), ("test", 45))
SPLIT_SALT = "skills-split-v1:"

NAMES = ("Ann", "Bob", "Eve", "Tom", "Sue", "Max", "Kim", "Leo", "Mia", "Sam", "Zoe", "Ben", "Ada", "Ray", "Liz", "Dan")
THINGS = ("cup", "hat", "key", "map", "box", "pen", "bag", "ring", "coat", "book", "lamp", "ball", "coin", "sock",
          "drum", "kite")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "melon", "banana"),
    "animal": ("wolf", "horse", "mouse", "tiger", "sheep", "goat", "rabbit", "camel", "snake", "bear"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "axe", "rake", "chisel", "pliers", "file"),
    "vehicle": ("car", "bus", "truck", "train", "boat", "bike", "plane", "tram", "ship", "van"),
    "colour": ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "gray"),
    "instrument": ("piano", "violin", "flute", "guitar", "harp", "trumpet", "cello", "banjo", "oboe", "tuba"),
    "body part": ("arm", "leg", "hand", "foot", "knee", "nose", "ear", "neck", "chin", "elbow"),
    "country": ("France", "Spain", "Chile", "Peru", "Japan", "Egypt", "Kenya", "Norway", "Italy", "India"),
}
PROPERTIES: dict[str, dict[str, str]] = {  # question template → {thing: answer}; PROPERTY_STATEMENTS says it
    "What colour is {}": {"snow": "white", "grass": "green", "the sky": "blue", "coal": "black", "a lemon": "yellow",
                          "blood": "red", "a banana": "yellow", "milk": "white", "a crow": "black", "a carrot": "orange",
                          "a leaf": "green", "the sea": "blue", "a tomato": "red", "chocolate": "brown", "ash": "gray"},
    "What sound does {} make": {"a dog": "bark", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a lion": "roar",
                                "a snake": "hiss", "a bee": "buzz", "an owl": "hoot", "a pig": "oink", "a sheep": "baa"},
    "Where does {} live": {"a fish": "sea", "a bird": "nest", "a bee": "hive", "a bear": "cave", "a cow": "farm",
                           "a fox": "den", "a spider": "web", "a monkey": "tree", "a camel": "desert", "a frog": "pond"},
}
PROPERTY_STATEMENTS = {"What colour is {}": "{} is {}.", "What sound does {} make": "{} says {}.",
                       "Where does {} live": "{} lives in the {}."}
SETS = ("arithmetic", "compare", "lookup", "sequence", "category", "property")

Draw = Callable[[random.Random], tuple[str, list[str], int, str]]  # (question, choices, answer index, statement)


def _shuffled(rng: random.Random, answer: str, distractors: Sequence[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _near(rng: random.Random, value: int, offsets: Sequence[int], low: int = 0) -> list[str]:
    """Three distinct numbers near `value` (value + an offset, never below `low`)."""
    pool = [value + d for d in offsets if value + d >= low]
    return [str(n) for n in rng.sample(pool, 3)]


def _arithmetic(rng: random.Random) -> tuple[str, list[str], int, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 19)
    if rng.random() < 0.5:
        op, value = "plus", a + b
    else:
        a = max(a, b)
        op, value = "minus", a - b
    choices, answer = _shuffled(rng, str(value), _near(rng, value, (-10, -2, -1, 1, 2, 10)))
    return f"What is {a} {op} {b}?", choices, answer, f"{a} {op} {b} is {value}."


def _listed(items: Sequence[str]) -> str:
    return f"{', '.join(items[:-1])} or {items[-1]}"


def _compare(rng: random.Random) -> tuple[str, list[str], int, str]:
    numbers = [str(n) for n in rng.sample(range(10, 100), 4)]
    word, pick = ("largest", max) if rng.random() < 0.5 else ("smallest", min)
    answer = str(pick(int(n) for n in numbers))
    statement = f"The {word} of {', '.join(numbers[:-1])} and {numbers[-1]} is {answer}."
    return f"Which number is the {word}: {_listed(numbers)}?", numbers, numbers.index(answer), statement


def _lookup(rng: random.Random) -> tuple[str, list[str], int, str]:
    names, things = rng.sample(NAMES, 3), rng.sample(THINGS, 4)
    facts = " ".join(f"{n} has a {t}." for n, t in zip(names, things))
    asked = rng.randrange(3)
    choices, answer = _shuffled(rng, things[asked], [t for i, t in enumerate(things) if i != asked])
    return f"{facts} What does {names[asked]} have?", choices, answer, f"{facts} So {names[asked]} has a {things[asked]}."


def _sequence(rng: random.Random) -> tuple[str, list[str], int, str]:
    value = rng.randint(1, 1498)
    word, answer = ("after", value + 1) if rng.random() < 0.5 else ("before", value - 1)
    choices, index = _shuffled(rng, str(answer), _near(rng, answer, (-2, -1, 1, 2, -10, 10, -100, 100)))
    return f"What comes {word} {value}?", choices, index, f"{word.capitalize()} {value} comes {answer}."


def _category(rng: random.Random) -> tuple[str, list[str], int, str]:
    wanted, *others = rng.sample(sorted(CATEGORIES), 4)
    options = [rng.choice(CATEGORIES[wanted])] + [rng.choice(CATEGORIES[c]) for c in others]
    answer = options[0]
    rng.shuffle(options)
    article = "an" if wanted[0] in "aeiou" else "a"
    statement = f"Of {', '.join(options[:-1])} and {options[-1]}, {answer} is {article} {wanted}."
    return f"Which one is {article} {wanted}: {_listed(options)}?", options, options.index(answer), statement


def _property(rng: random.Random) -> tuple[str, list[str], int, str]:
    template = rng.choice(sorted(PROPERTIES))
    facts = PROPERTIES[template]
    thing = rng.choice(sorted(facts))
    others = sorted({v for v in facts.values()} - {facts[thing]})
    options, answer = _shuffled(rng, facts[thing], rng.sample(others, 3))
    statement = PROPERTY_STATEMENTS[template].format(thing[0].upper() + thing[1:], facts[thing])
    return f"{template.format(thing)}: {_listed(options)}?", options, answer, statement


GENERATORS: dict[str, Draw] = {"arithmetic": _arithmetic, "compare": _compare, "lookup": _lookup,
                               "sequence": _sequence, "category": _category, "property": _property}
assert tuple(GENERATORS) == SETS


def _check_set(name: str) -> None:
    if name not in GENERATORS:
        raise DataSourceError(f"unknown skills set {name!r}; valid: {', '.join(SETS)}")


@functools.cache
def _generated(name: str) -> tuple[tuple[QAExample, ...], dict[str, str]]:
    _check_set(name)
    rng, draw = random.Random(f"skills-v{GENERATOR_VERSION}:{name}"), GENERATORS[name]
    examples: list[QAExample] = []
    statements: dict[str, str] = {}  # question text → the same fact as a plain sentence
    for _ in range(EXAMPLES_PER_SET * 50):
        question, choices, answer, statement = draw(rng)
        if question in statements:
            continue
        statements[question] = statement
        assert len(set(choices)) == 4 and 0 <= answer < 4, (question, choices)
        examples.append(QAExample(f"{name}-{len(examples):05d}", name, question, tuple(choices), answer))
        if len(examples) == EXAMPLES_PER_SET:
            return tuple(examples), statements
    raise AssertionError(f"skills set {name!r} has fewer than {EXAMPLES_PER_SET} distinct questions")


def generate(name: str) -> tuple[QAExample, ...]:
    """The `EXAMPLES_PER_SET` examples of one set, distinct question texts, in generation order."""
    return _generated(name)[0]


def statement(example: QAExample) -> str:
    """The fact a question asks about, as a plain sentence that holds its answer ("23 plus 9 is 32.",
    "Snow is white."): the form the tiny LM meets its knowledge in when it pretrains on prose."""
    return _generated(example.source)[1][example.question]


def split_names() -> tuple[str, ...]:
    return tuple(name for name, _ in SPLITS)


def split_of(question: str) -> str:
    """The split of a question text: fixed by a salted sha256 of the text alone."""
    return split_of_bucket(hash_bucket(SPLIT_SALT, question), SPLITS)


@functools.cache
def _partition(name: str) -> dict[str, tuple[QAExample, ...]]:
    parts: dict[str, list[QAExample]] = {split: [] for split in split_names()}
    for example in generate(name):
        parts[split_of(example.question)].append(example)
    return {split: tuple(examples) for split, examples in parts.items()}


def data_fingerprint(sets: Sequence[str] = SETS) -> str:
    """Hash of the examples of `sets` (with their statements) and of the split table; changes with any
    template or list."""
    h = hashlib.sha256(json.dumps([GENERATOR_VERSION, SPLIT_SALT, SPLITS]).encode())
    for name in sets:
        for ex in generate(name):
            h.update(json.dumps([ex.id, ex.question, list(ex.choices), ex.answer, statement(ex)]).encode())
    return h.hexdigest()[:16]


def parse_sets(spec: str) -> list[str]:
    """`all` → every set; `a+b` → [a, b] (a benchmark's set list after `skills:`)."""
    names = list(SETS) if spec == "all" else spec.split("+")
    for name in names:
        _check_set(name)
    if len(set(names)) != len(names):
        raise DataSourceError(f"skills sets must be distinct, got {spec!r}")
    return names


class SkillsSource:
    """The skills' questions of the chosen sets (default: all six), concatenated in set order."""

    name = "skills"

    def __init__(self, sets: Sequence[str] | None = None):
        if isinstance(sets, str):
            raise DataSourceError(f"sets must be a list of skills set names, got the string {sets!r}")
        chosen = tuple(SETS) if sets is None else tuple(sets)
        if not chosen or len(set(chosen)) != len(chosen):
            raise DataSourceError(f"choose distinct skills sets from {', '.join(SETS)}; got {list(chosen)}")
        for name in chosen:
            _check_set(name)
        self._sets = chosen

    def __repr__(self) -> str:
        return f"SkillsSource(sets={list(self._sets)!r})"

    def sets(self) -> tuple[str, ...]:
        return self._sets

    def splits(self) -> tuple[str, ...]:
        return split_names()

    def examples(self, split: str) -> tuple[QAExample, ...]:
        """Every example of `split` over the chosen sets, in set order."""
        return tuple(ex for name in self._sets for ex in self.examples_of(name, split))

    def examples_of(self, set_name: str, split: str) -> tuple[QAExample, ...]:
        if set_name not in self._sets:
            raise DataSourceError(f"skills set {set_name!r} is not in this source; valid: {', '.join(self._sets)}")
        if split not in split_names():
            raise DataSourceError(f"the skills source has no split {split!r}; valid: {', '.join(split_names())}")
        return _partition(set_name)[split]


__all__ = ["EXAMPLES_PER_SET", "GENERATOR_VERSION", "SETS", "SPLITS", "SkillsSource", "data_fingerprint", "generate",
           "parse_sets", "split_of"]
