"""Manifest fuzzing: whatever the YAML, loading ends in a valid Manifest or a ManifestError.

Four generators, 1,200 examples in all: mutations of the shipped manifests' data (keys
dropped, replaced, added; wrong types; huge, negative and non-finite numbers; unicode;
nested garbage), mutations of their text (flipped bytes, cuts, YAML punctuation), random
documents built from the schema's own keys, and `key=value` overrides. A valid result must
also expand into jobs, since that is what every stage does next.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.jobs import expand
from pipeline.manifest import DISTRIBUTIONS, MAX_COUNT, Manifest, ManifestError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "manifests").glob("*.yaml"))
TEXTS = [p.read_text() for p in SHIPPED]
DATA = [yaml.safe_load(t) for t in TEXTS]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _schema_words() -> list[str]:
    """Every key and literal the schema knows: fuzzed documents look like manifests."""
    import typing

    from pydantic import BaseModel

    words: set[str] = set(DISTRIBUTIONS)
    stack: list = [Manifest]
    seen: set = set()
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                continue
            seen.add(annotation)
            words.update(annotation.model_fields)
            stack.extend(f.annotation for f in annotation.model_fields.values())
        elif typing.get_origin(annotation) is typing.Literal:
            words.update(str(a) for a in typing.get_args(annotation))
        else:
            stack.extend(typing.get_args(annotation))
    return sorted(words)


WORDS = _schema_words()
ODD_TEXT = ["", " ", "../../etc", "/etc/passwd", "..", "tiny:shapes-sd", "tiny:", "hf:", "folder:", "qa:arc_easy",
            "x" * 300, "é", "名前", "🙂", "\u202e", "\t", "a\nb", "null", "~", "NaN", "1e999", "-0", "0x1F"]
NUMBERS = [0, -1, 1, 2, 2**31, 2**63, -2**63, 10**40, 10**70, 0.5, -0.0, 1e-320, 1e308, float("inf"), float("-inf"), float("nan")]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(NUMBERS), st.floats(),
    st.text(max_size=20), st.sampled_from(WORDS), st.sampled_from(ODD_TEXT),
)
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=10), st.integers(-3, 3), st.none(), st.booleans())
garbage = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=10,
)


def check_loads_cleanly(text: str, overrides: list[str] | None = None) -> Manifest | None:
    """A Manifest that expands, or None after a ManifestError; any other exception fails the test."""
    try:
        manifest = Manifest.from_text(text, source="fuzz.yaml", overrides=overrides or [])
    except ManifestError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
        assert "Traceback" not in str(exc)
        return None
    manifest.canonical_json().encode("utf-8")
    json.dumps(manifest.model_dump(mode="json"), allow_nan=False)  # standard JSON: every number finite
    jobs = list(expand(manifest, limit=3))
    assert len({job.job_id for job in jobs}) == len(jobs) == min(3, manifest.count)
    for job in jobs:
        json.dumps(json.loads(job.to_json()), allow_nan=False)
        assert job.spec.rank >= 1 and 0 <= job.spec.lora_dropout < 1
    check_counts_bounded(manifest.model_dump(mode="json"))
    return manifest


def check_counts_bounded(node, key: str = "") -> None:
    """Every whole number of a valid manifest, seeds aside, is at most MAX_COUNT: nothing it asks for
    (groups, steps, seeds of the predictors, ranks, cohorts) can keep a worker busy forever."""
    if isinstance(node, dict):
        for k, value in node.items():
            check_counts_bounded(value, str(k))
    elif isinstance(node, list):
        for value in node:
            check_counts_bounded(value, key)
    elif isinstance(node, int) and not isinstance(node, bool) and key not in ("seed", "split_seed"):
        assert abs(node) <= MAX_COUNT, (key, node)


def _paths(node, prefix=()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


def _mutate(data, path: tuple, action: str, value, key) -> object:
    """Apply one mutation at `path`; returns the (possibly new) root."""
    if not path:
        return value if action == "replace" else [data] if action == "wrap" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "replace":
        parent[last] = value
    elif action == "wrap":
        parent[last] = [parent[last]] if not isinstance(parent[last], list) else {"choice": parent[last]}
    elif action == "add" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif action == "stringify":
        parent[last] = str(parent[last])
    elif action == "negate" and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
        parent[last] = -parent[last] * 10**12
    return data


@st.composite
def mutated_documents(draw) -> str:
    data = yaml.safe_load(draw(st.sampled_from(TEXTS)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["delete", "replace", "replace", "extreme", "wrap", "add", "stringify", "negate"]))
        value = draw(st.sampled_from(NUMBERS + ODD_TEXT) if action == "extreme" else garbage)
        data = _mutate(data, path, "replace" if action == "extreme" else action, value, draw(keys))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=draw(st.booleans()))


SNIPPETS = ["{", "}", "[", "]", ": ", "- ", "&a ", "*a", "*missing", "!!set ", "!!binary ", "!!python/object:os.system ",
            "? ", "|", ">", "'", '"', "#", "\t", "\x00", "\ufeff", "\x85", "%YAML 1.1\n", "---\n", "...\n", "<<: *a\n",
            "!!int ", "!!float ", '"\\ud800"', "9" * 80, ".nan", "-.inf"]


@st.composite
def damaged_texts(draw) -> str:
    text = draw(st.sampled_from(TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "swap_lines"]))
        if action == "flip" and at < len(text):
            text = text[:at] + chr(ord(text[at]) ^ (1 << draw(st.integers(0, 6)))) + text[at + 1:]
        elif action == "cut":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        elif action == "insert":
            text = text[:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=6)) + text[at:]
        elif action == "truncate":
            text = text[:at]
        elif action == "swap_lines" and text:
            lines = text.splitlines(keepends=True)
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
    return text


SECTIONS = list(Manifest.model_fields)


@st.composite
def schema_shaped(draw) -> str:
    """Documents built from the schema's sections and keys, with a real manifest's values mixed in."""
    real = draw(st.sampled_from(DATA))
    document = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), max_size=len(SECTIONS), unique=True)):
        source = real.get(section)
        if isinstance(source, dict) and draw(st.booleans()):
            document[section] = {k: (v if draw(st.booleans()) else draw(garbage)) for k, v in source.items()}
        else:
            document[section] = source if draw(st.booleans()) else draw(garbage)
    return yaml.safe_dump(document, sort_keys=draw(st.booleans()))


DOTTED = sorted({".".join(str(p) for p in path) for data in DATA for path in _paths(data) if path
                 and all(isinstance(p, str) for p in path)})


@st.composite
def override_lists(draw) -> tuple[str, list[str]]:
    overrides = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(DOTTED) | st.text(max_size=12))
        raw = draw(st.one_of(st.text(max_size=15), st.sampled_from(SNIPPETS),
                             garbage.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())))
        overrides.append(f"{key}={raw}" if draw(st.integers(0, 9)) else key)
    return draw(st.sampled_from(TEXTS)), overrides


@settings(FUZZ, max_examples=400)
@given(mutated_documents())
def test_mutated_manifests_load_or_fail_cleanly(text):
    check_loads_cleanly(text)


@settings(FUZZ, max_examples=300)
@given(damaged_texts())
def test_damaged_manifest_text_loads_or_fails_cleanly(text):
    check_loads_cleanly(text)


@settings(FUZZ, max_examples=250)
@given(schema_shaped())
def test_schema_shaped_documents_load_or_fail_cleanly(text):
    check_loads_cleanly(text)


@settings(FUZZ, max_examples=250)
@given(override_lists())
def test_fuzzed_overrides_load_or_fail_cleanly(case):
    text, overrides = case
    check_loads_cleanly(text, overrides)


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=300), st.sampled_from(TEXTS))
def test_manifest_files_with_arbitrary_bytes_load_or_fail_cleanly(tmp_path_factory, blob, text):
    path = tmp_path_factory.mktemp("bytes") / "m.yaml"
    path.write_bytes(text.encode()[: len(text) // 2] + blob)
    try:
        Manifest.from_yaml(path)
    except ManifestError as exc:
        assert exc.problems


def test_every_shipped_manifest_passes_the_same_check():
    assert all(check_loads_cleanly(text) is not None for text in TEXTS)


def test_the_fuzzers_reach_both_outcomes():
    """Guard against a generator that only ever produces garbage (or only valid manifests)."""
    rng = random.Random(0)
    outcomes = {True: 0, False: 0}
    for _ in range(60):
        data = yaml.safe_load(rng.choice(TEXTS))
        path = rng.choice(_paths(data)[1:])
        mutated = _mutate(data, path, rng.choice(["delete", "replace"]), rng.choice([None, 1, "x", [1]]), "k")
        outcomes[check_loads_cleanly(yaml.safe_dump(mutated)) is not None] += 1
    assert outcomes[True] >= 5 and outcomes[False] >= 5, outcomes


HOSTILE_FILES = {
    "deep.yaml": "population: " + "[" * 2000 + "]" * 2000 + "\n",
    "nan.yaml": TEXTS[0].replace("seed: ", "seed: .nan #", 1),
    "set.yaml": TEXTS[0] + "\nextra: !!set {a, b}\n",
    "python-tag.yaml": "population: !!python/object/apply:os.system ['echo pwned']\n",
    "huge-int.yaml": TEXTS[0].replace("count: ", "count: " + "9" * 5000 + " #", 1),
    "bad-utf8.yaml": None,  # written as bytes below
    "surrogate.yaml": 'population: {name: "\\ud800"}\n',
    "escape.yaml": TEXTS[0].replace("name: ", "name: ../../outside #", 1),
    "alias-loop.yaml": "population: &a [*a]\n",
    "tabs.yaml": "population:\n\tname: x\n",
    "duplicate-key.yaml": TEXTS[0] + "\ncount: 4\n",
    "huge-group.yaml": TEXTS[-1].replace("group_size: 20", "group_size: 1000000000", 1),
    "huge-seeds.yaml": re.sub(r"\n  seeds: \d+", "\n  seeds: 100000000000000000000", TEXTS[-1], count=1),  # learn.seeds
    "huge-steps.yaml": TEXTS[-1].replace("steps: {choice: [24, 32, 40, 48]}", "steps: 100000000000", 1),
}


def _write_hostile(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    text = HOSTILE_FILES[name]
    if text is None:
        path.write_bytes(TEXTS[0].encode() + b"\nbad: \xff\xfe\n")
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_lol_validate_refuses_hostile_files_with_exit_2(run_cli, tmp_path, name):
    code, out, err = run_cli("validate", _write_hostile(tmp_path, name))
    assert code == 2 and "error:" in err and name in err, (code, out, err)


def test_lol_console_script_prints_problems_and_no_traceback(tmp_path):
    """The real console script, in fresh processes, on a few of the hostile files."""
    lol = Path(sys.executable).with_name("lol")
    for name in ("deep.yaml", "bad-utf8.yaml", "python-tag.yaml"):
        path = _write_hostile(tmp_path, name)
        result = subprocess.run([str(lol), "validate", str(path)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert "error:" in result.stderr and "problem" in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, (name, result.stderr)


def _seeded_damage(seed: int) -> str:
    """A reproducible damaged manifest for the CLI check: a few flips, cuts and insertions."""
    rng = random.Random(seed)
    text = rng.choice(TEXTS)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(text))
        text = rng.choice([
            text[:at] + chr(ord(text[at]) ^ (1 << rng.randrange(7))) + text[at + 1:],
            text[:at] + rng.choice(SNIPPETS) + text[at:],
            text[:at] + text[at + rng.randint(1, 40):],
        ])
    return text


@pytest.mark.parametrize("seed", range(20))
def test_lol_validate_in_process_on_fuzzed_files(run_cli, tmp_path, seed):
    """Damaged files through `main()`: exit 0 with a ✓, or exit 2 with the problems; nothing escapes."""
    path = tmp_path / "fuzzed.yaml"
    path.write_text(_seeded_damage(seed), encoding="utf-8")
    code, out, err = run_cli("validate", path)
    assert (code == 0 and "✓" in out) or (code == 2 and "error:" in err), (code, out, err)


# ---------------------------------------------------------------- issue 20, finding 7: valid manifests that never finish

UNFINISHABLE = {  # hostile file -> the problem `lol validate` must name (before: each validated, then ran forever)
    "duplicate-key.yaml": "count (line",
    "huge-group.yaml": "data.subsets.group_size (line",
    "huge-seeds.yaml": "learn.seeds (line",
    "huge-steps.yaml": "hyperparameters.steps (line",
}


@pytest.mark.parametrize("name", sorted(UNFINISHABLE))
def test_lol_validate_names_the_count_that_would_never_finish(run_cli, tmp_path, name):
    assert all(HOSTILE_FILES[n] != TEXTS[-1] and HOSTILE_FILES[n] != TEXTS[0] for n in UNFINISHABLE)  # each edit applied
    code, out, err = run_cli("validate", _write_hostile(tmp_path, name))
    assert code == 2 and UNFINISHABLE[name] in " ".join(err.split()), (code, out, err)


@st.composite
def duplicated_lines(draw) -> tuple[str, int]:
    """A shipped manifest with one `key: value` line written twice, consecutively."""
    text = draw(st.sampled_from(TEXTS))
    lines = text.splitlines(keepends=True)
    candidates = [i for i, line in enumerate(lines)
                  if ":" in line and not line.lstrip().startswith(("#", "- ")) and line.split(":")[0].strip().isidentifier()
                  and line.count("[") == line.count("]") and line.count("{") == line.count("}")]  # not a flow spanning lines
    i = draw(st.sampled_from(candidates))
    return "".join(lines[:i + 1] + lines[i:]), i + 1


@settings(FUZZ, max_examples=100)
@given(duplicated_lines())
def test_a_key_written_twice_is_an_error_naming_both_lines(case):
    text, first = case
    with pytest.raises(ManifestError) as info:
        Manifest.from_text(text)
    key = text.splitlines()[first - 1].split(":")[0].strip()
    assert any(f"(line {first + 1}): duplicate key, first written on line {first}" in p and key in p
               for p in info.value.problems), info.value.problems


def _images(n: int):
    from pipeline.data.base import ImageExample

    colors, shapes = ("red", "blue", "green"), ("circle", "triangle")
    return [ImageExample(f"img{i}", Path(f"/nonexistent/{i}.png"), "a circle", shapes[i % 2],
                         {"color": colors[i % 3], "shape": shapes[i % 2]}) for i in range(n)]


def test_a_group_larger_than_the_data_fails_at_once_instead_of_spinning():
    """`identity_group` drew a billion slots one by one (the worker renewing its claims all along)."""
    import threading

    from pipeline.data import DataSourceError
    from pipeline.data.subsets import job_examples

    outcome: list = []

    def draw() -> None:
        try:
            job_examples(_images(30), {"kind": "identity_groups", "group": 0, "group_size": 10**9}, 0)
            outcome.append("drawn")
        except DataSourceError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=draw, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "identity_group is still drawing a 10⁹-image group after 20 s"
    assert "group_size is 1,000,000,000, but the split holds 30 images" in outcome[0], outcome
    assert len(job_examples(_images(30), {"kind": "identity_groups", "group": 0, "group_size": 30}, 0)) == 30


class _DataTrainer:
    """Draws each job's data as the real trainers do (no torch); writes a tiny adapter."""

    def setup(self, manifest: Manifest, store) -> None:
        self.examples = _images(40)  # a split smaller than the manifest's groups

    def run(self, job, out_dir: Path) -> dict:
        from pipeline.data.subsets import job_examples

        job_examples(self.examples, job.spec.data, job.spec.seed)
        (out_dir / "adapter").mkdir(parents=True)
        (out_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 64)
        (out_dir / "adapter" / "adapter_config.json").write_text("{}")
        return {"final_loss": 0.5}


def test_a_job_whose_group_outgrows_its_split_fails_with_the_reason(tmp_path):
    """A group size within the source (≤ 5,000 images) can still outgrow the split a job draws from:
    the job fails with the reason in failed.json and the run's summary; the run ends."""
    from pipeline.finetune.runner import finetune_population
    from storage import Store

    manifest = Manifest.from_text(TEXTS[-1], overrides=["count=3", "data.subsets.group_size=4000", "execution.cohort_size=1"])
    summary = finetune_population(manifest, Store(str(tmp_path / "store")), _DataTrainer, lease_s=5)
    assert not summary.trained and len(summary.failed) == 3, summary
    assert all("group_size is 4,000, but the split holds 40 images" in why for why in summary.failed.values()), summary.failed
