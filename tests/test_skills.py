"""The `skills` source: the tiny world's learnable multiple-choice questions."""

from __future__ import annotations

import re

import pytest

from pipeline.data import get_source
from pipeline.data.base import DataSourceError
from pipeline.data.skills import (
    CATEGORIES,
    EXAMPLES_PER_SET,
    PROPERTIES,
    SETS,
    SkillsSource,
    data_fingerprint,
    generate,
    parse_sets,
    split_of,
    statement,
)
from pipeline.score.lm_scorers import benchmark_examples


def right_answer(set_name: str, question: str, choices: tuple[str, ...]) -> str:
    """The answer recomputed from the question text alone (knowledge sets: from the word lists)."""
    if set_name == "arithmetic":
        a, op, b = re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", question).groups()
        return str(int(a) + int(b) if op == "plus" else int(a) - int(b))
    if set_name == "compare":
        word, listed = re.fullmatch(r"Which number is the (largest|smallest): (.*)\?", question).groups()
        numbers = [int(n) for n in re.findall(r"\d+", listed)]
        assert sorted(numbers) == sorted(int(c) for c in choices)
        return str(max(numbers) if word == "largest" else min(numbers))
    if set_name == "lookup":
        facts = dict(re.findall(r"(\w+) has a (\w+)\.", question))
        return facts[re.search(r"What does (\w+) have\?", question).group(1)]
    if set_name == "sequence":
        word, n = re.fullmatch(r"What comes (after|before) (\d+)\?", question).groups()
        return str(int(n) + 1 if word == "after" else int(n) - 1)
    if set_name == "category":
        wanted = re.fullmatch(r"Which one is an? ([a-z ]+):.*", question).group(1)
        members = [c for c in choices if c in CATEGORIES[wanted]]
        assert len(members) == 1, (question, choices)
        return members[0]
    for template, facts in PROPERTIES.items():
        match = re.fullmatch(re.escape(template).replace(r"\{\}", "(.+)") + r": .*\?", question)
        if match:
            return facts[match.group(1)]
    raise AssertionError(f"no property template matches {question!r}")


@pytest.mark.parametrize("set_name", SETS)
def test_every_question_has_four_distinct_choices_and_the_right_answer(set_name):
    examples = generate(set_name)
    assert len(examples) == EXAMPLES_PER_SET
    assert len({e.question for e in examples}) == EXAMPLES_PER_SET  # no question text twice
    for e in examples:
        assert e.source == set_name and len(set(e.choices)) == 4
        assert e.choices[e.answer] == right_answer(set_name, e.question, e.choices), e
        said = statement(e)  # the same fact as prose: it names the answer and no other choice
        assert re.search(rf"\b{re.escape(e.choices[e.answer])}\b", said), (e, said)
        if set_name == "property":
            assert not any(re.search(rf"\b{re.escape(c)}\b", said) for i, c in enumerate(e.choices) if i != e.answer), said


@pytest.mark.parametrize("set_name", SETS)
def test_answers_are_spread_over_the_four_positions(set_name):
    positions = [e.answer for e in generate(set_name)]
    assert all(0.2 < positions.count(i) / len(positions) < 0.3 for i in range(4))


def test_the_generator_is_pinned():
    """A changed template or word list changes every label: it must come with GENERATOR_VERSION bumped,
    and this fingerprint updated."""
    assert data_fingerprint() == "74ab9a0a7e8d3def"
    assert generate("lookup")[0].id == "lookup-00000"


def test_splits_are_disjoint_by_question_text_and_the_test_split_has_over_500_questions():
    source = SkillsSource()
    by_split = {split: source.examples(split) for split in source.splits()}
    assert source.splits() == ("pretrain", "train", "validation", "test")
    assert sum(len(v) for v in by_split.values()) == EXAMPLES_PER_SET * len(SETS)
    texts = {split: {e.question for e in v} for split, v in by_split.items()}
    for a in texts:
        for b in texts:
            assert a == b or not texts[a] & texts[b]
        assert all(split_of(q) == a for q in texts[a])
    assert len(by_split["test"]) >= 500
    assert all(len(source.examples_of(s, "test")) >= 75 for s in SETS)
    # the split of a question does not depend on which sets are chosen
    assert SkillsSource(["sequence"]).examples("test") == source.examples_of("sequence", "test")


def test_benchmarks_name_sets():
    everything = benchmark_examples("skills:all", "test")
    assert [e.source for e in everything] == [s for s in SETS for _ in SkillsSource([s]).examples("test")]
    two = benchmark_examples("skills:lookup+compare", "validation", limit=10)
    assert len(two) == 10 and {e.source for e in two} == {"lookup"}
    assert parse_sets("sequence+category") == ["sequence", "category"]
    with pytest.raises(DataSourceError, match="unknown skills set 'algebra'; valid: arithmetic, compare"):
        benchmark_examples("skills:algebra", "test")
    with pytest.raises(DataSourceError, match="no split 'holdout'; valid: pretrain, train, validation, test"):
        get_source("skills").examples("holdout")


def test_a_source_subset_job_draws_its_own_examples_of_the_chosen_skills():
    from pipeline.data.subsets import job_examples

    train = get_source("skills").examples("train")
    descriptor = {"kind": "source_subsets", "sources": ["lookup", "sequence"], "examples_per_source": 40}
    first, again, other = (job_examples(train, descriptor, seed) for seed in (1, 1, 2))
    assert first == again and first != other
    assert [e.source for e in first] == ["lookup"] * 40 + ["sequence"] * 40
