"""The manifest schema: shipped manifests validate; each kind of bad input names its YAML path."""

from __future__ import annotations

import pytest
import yaml
from conftest import MANIFESTS, ROOT

from pipeline.manifest import Manifest, ManifestError


def test_every_shipped_manifest_validates():
    problems = {}
    for path in MANIFESTS:
        try:
            Manifest.from_yaml(path)
        except ManifestError as exc:
            problems[path.name] = exc.problems
    assert len(MANIFESTS) >= 6
    assert not problems, problems


def test_shipped_manifests_include_the_embedded_default_and_paper_reproductions():
    names = {p.stem for p in MANIFESTS}
    assert {"tiny-shapes", "tiny-shapes-membership", "tiny-arc", "celeba-sd14",
            "imagenette-sd14-r32", "qwen2-arc"} <= names


def test_celeba_manifest_matches_the_paper_grid():
    m = Manifest.from_yaml(ROOT / "manifests" / "celeba-sd14.yaml")
    hp = m.hyperparameters
    assert m.base.ref == "CompVis/stable-diffusion-v1-4" and m.lora.rank == [4] and m.lora.alpha == 27
    assert hp.learning_rate.choice == [1e-4, 3e-4, 1e-3, 3e-3]
    assert hp.steps.choice == [100, 133, 167, 200]
    assert hp.gradient_accumulation.choice == [1, 2]
    assert hp.instance_prompt.choice == ["celebrity", "person", "thing", "skd"]
    assert (hp.batch_size, hp.resolution, hp.mixed_precision) == (1, 512, "fp16")


def test_qwen2_manifest_leaves_out_arc_sources():
    m = Manifest.from_yaml(ROOT / "manifests" / "qwen2-arc.yaml")
    assert len(m.data.subsets.sources) == 19 and "Mercury" not in m.data.subsets.sources
    assert m.hyperparameters.learning_rate.loguniform == (1e-5, 1e-3)
    assert m.hyperparameters.epochs.choice == [2, 3, 4]


def _errors(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        Manifest.from_text(text, source="t.yaml")
    return info.value.problems


def _mutated(tiny_manifest_text: str, edit) -> str:
    data = yaml.safe_load(tiny_manifest_text)
    edit(data)
    return yaml.safe_dump(data, sort_keys=False)


BAD_CASES = [
    # (edit, expected path prefix, expected words in the message)
    (lambda d: d["lora"].__setitem__("rank", [4, 8, -2]), "lora.rank[2]", "greater than or equal to 1"),
    (lambda d: d.__setitem__("count", -5), "count", "greater than or equal to 1"),
    (lambda d: d.__setitem__("count", "many"), "count", "valid integer"),
    (lambda d: d["lora"].__setitem__("alhpa", 3), "lora.alhpa", "did you mean 'alpha'"),
    (lambda d: d.__setitem__("scorer", []), "scorer", "did you mean 'scorers'"),
    (lambda d: d["hyperparameters"].__setitem__("learning_rate", {"loguniform": [0, 1]}),
     "hyperparameters.learning_rate.loguniform", "0 < low"),
    (lambda d: d["hyperparameters"].__setitem__("steps", {"normal": [1, 2]}),
     "hyperparameters.steps", "expected a fixed value or one of"),
    (lambda d: d["hyperparameters"].__setitem__("lr", 1e-3), "hyperparameters.lr", "unknown key"),
    (lambda d: d["base"].__setitem__("ref", "tiny:nope"), "base", "known diffusion bases: tiny:shapes-sd"),
    (lambda d: d["base"].__setitem__("kind", "gan"), "base.kind", "'diffusion' or 'causal_lm'"),
    (lambda d: d["data"]["subsets"].__setitem__("kind", "everything"), "data.subsets", "identity_groups"),
    (lambda d: d["data"].__setitem__("source", "ftp:x"), "data.source", "unknown data source"),
    (lambda d: d["scorers"][0].__setitem__("prompts", []), "scorers[0].prompts", "at least one non-empty prompt"),
    (lambda d: d["scorers"][1].__setitem__("attributes", []), "scorers[1].attributes", "at least 1 item"),
    (lambda d: d["publish"].__setitem__("splits", {"train": 0.5, "test": 0.1}), "publish.splits", "sum to 1"),
    (lambda d: d["learn"].__setitem__("predictors", ["glnet", "svm"]), "learn.predictors[1]", "'glnet'"),
    (lambda d: d.pop("lora"), "lora", "required key is missing"),
    (lambda d: d["hyperparameters"].__setitem__("epochs", 3), "hyperparameters.epochs", "does not apply to diffusion"),
    (lambda d: d["hyperparameters"].pop("steps"), "hyperparameters", "needs steps for diffusion"),
    (lambda d: d["scorers"].append({"name": "mc_accuracy", "benchmark": "qa:arc_easy"}), "scorers[2].name",
     "scorer 'mc_accuracy' does not apply to diffusion"),
]


@pytest.mark.parametrize(("edit", "path", "words"), BAD_CASES)
def test_bad_input_reports_its_yaml_path(tiny_manifest_text, edit, path, words):
    problems = _errors(_mutated(tiny_manifest_text, edit))
    matching = [p for p in problems if p.startswith(path)]
    assert matching, problems
    assert any(words in p for p in matching), problems


def test_every_error_is_reported_at_once_with_line_numbers(tiny_manifest_text):
    text = tiny_manifest_text.replace("rank: 4", "rank: 0").replace("count: 320", "count: -1")
    text = text.replace("num_groups: 160", "num_groups: 160\n    group_sise: 3")
    problems = _errors(text)
    lines = text.splitlines()
    assert len(problems) == 3, problems
    for problem, needle in zip(problems, ["group_sise", "rank: 0", "count: -1"]):
        expected_line = next(i + 1 for i, line in enumerate(lines) if needle in line)
        assert f"(line {expected_line})" in problem, (problem, expected_line)


def test_not_yaml_reports_line():
    problems = _errors("population:\n  name: [unclosed\n")
    assert problems[0].startswith("not valid YAML: line")


def test_top_level_must_be_a_mapping():
    assert "top level must be a mapping" in _errors("- a\n- b\n")[0]


def test_overrides_apply_with_yaml_types(tiny_manifest_text):
    m = Manifest.from_text(tiny_manifest_text, overrides=["count=7", "lora.rank=[4, 8]", "data.subsets.group_size=5"])
    assert (m.count, m.lora.rank, m.data.subsets.group_size) == (7, [4, 8], 5)


def test_bad_override_is_reported(tiny_manifest_text):
    with pytest.raises(ManifestError) as info:
        Manifest.from_text(tiny_manifest_text, overrides=["count"])
    assert "key.path=value" in info.value.problems[0]


def test_missing_file_lists_what_is_there(tmp_path):
    (tmp_path / "real.yaml").write_text("x: 1\n")
    with pytest.raises(ManifestError) as info:
        Manifest.from_yaml(tmp_path / "rael.yaml")
    assert "real.yaml" in str(info.value)


def test_schema_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.manifest, pipeline.jobs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- issue 20, finding 7: manifests that never finish

ABSURD = [  # (override, path of the problem, words of the message): each validated before the bounds
    ("data.subsets.group_size=1000000000", "data.subsets.group_size", "less than or equal to 100000"),
    ("data.subsets.group_size=5001", "data.subsets.group_size", "source 'shapes' holds 5,000 images"),
    ("learn.seeds=100000000000000000000", "learn.seeds", "less than or equal to 100"),
    ("hyperparameters.steps=100000000000", "hyperparameters.steps", "1..100,000"),
    ("hyperparameters.steps={int_range: [1, 100000000000]}", "hyperparameters.steps", "1..100,000"),
    ("hyperparameters.batch_size={choice: [4, 10000000]}", "hyperparameters.batch_size", "1..4,096"),
    ("hyperparameters.gradient_accumulation=100000", "hyperparameters.gradient_accumulation", "1..1,024"),
    ("hyperparameters.resolution=1000000", "hyperparameters.resolution", "1..4,096"),
    ("lora.rank=100000000", "lora.rank[0]", "less than or equal to 4096"),
    ("lora.rank=[4, 100000000]", "lora.rank[1]", "less than or equal to 4096"),
    ("count=100000000", "count", "less than or equal to 10000000"),
    ("data.subsets.num_groups=1000000000000", "data.subsets.num_groups", "less than or equal to 10000000"),
    ("learn.epochs=1000000000", "learn.epochs", "less than or equal to 100000"),
    ("learn.batch_size=1000000000", "learn.batch_size", "less than or equal to 4096"),
    ("learn.hidden=1000000000", "learn.hidden", "less than or equal to 16384"),
    ("execution.max_cohort_size=1000000000", "execution.max_cohort_size", "less than or equal to 1024"),
    ("execution.cohort_size=1000000000", "execution.cohort_size", "1024"),
    ("scorers=[{name: clip_score, prompts: [a], steps: 1000000000}]", "scorers[0].steps", "less than or equal to 1000"),
    ("scorers=[{name: clip_score, prompts: [a], images_per_prompt: 1000000000}]", "scorers[0].images_per_prompt", "1000"),
]


@pytest.mark.parametrize(("override", "path", "words"), ABSURD)
def test_absurd_counts_are_refused_with_their_yaml_path(tiny_manifest_text, override, path, words):
    with pytest.raises(ManifestError) as info:
        Manifest.from_text(tiny_manifest_text, overrides=[override])
    matching = [p for p in info.value.problems if p.startswith(path)]
    assert matching and any(words in p for p in matching), info.value.problems


@pytest.mark.parametrize("override", [
    "data.subsets.group_size=5000", "learn.seeds=100", "hyperparameters.steps=100000", "lora.rank=[1, 4096]",
    "hyperparameters.batch_size={int_range: [1, 4096]}", "execution.cohort_size=1024", "count=10000000",
])
def test_the_bounds_themselves_are_valid(tiny_manifest_text, override):
    Manifest.from_text(tiny_manifest_text, overrides=[override])


def test_the_group_size_bound_is_reported_at_its_line(tiny_manifest_text):
    text = tiny_manifest_text.replace("group_size: 20", "group_size: 1000000")
    problems = _errors(text)
    line = next(i + 1 for i, row in enumerate(text.splitlines()) if "group_size: 1000000" in row)
    assert problems == [p for p in problems if p.startswith(f"data.subsets.group_size (line {line}):")], problems


def _int_fields():
    """(model, field name, FieldInfo) of every integer field of the schema."""
    import typing

    from pydantic import BaseModel

    stack, seen, found = [Manifest], set(), []
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                continue
            seen.add(annotation)
            for name, info in annotation.model_fields.items():
                flat = str(info.annotation)
                if "int" in flat and "float" not in flat and "Scalar" not in flat:
                    found.append((annotation, name, info))
                stack.append(info.annotation)
        else:
            stack.extend(typing.get_args(annotation))
    return found


SEEDS = {"seed", "split_seed"}  # seeds name a random stream, they count nothing
# Bounded elsewhere, or not an amount of work: min/max_classes by the class list (ClassSubsets), int_range
# by the hyperparameter it draws (HYPERPARAMETER_MAXIMA), min_identity_images is a threshold (more only drops identities).
BOUNDED_ELSEWHERE = {"min_classes", "max_classes", "int_range", "min_identity_images"}


def test_every_count_a_user_can_type_has_an_upper_bound_stated_in_its_description():
    import annotated_types

    def upper(info):
        metadata = list(info.metadata)
        for arg in typing_args(info.annotation):
            metadata += getattr(arg, "metadata", [])
        return [m.le for m in metadata if isinstance(m, annotated_types.Le)]

    def typing_args(annotation):
        import typing

        out, stack = [], [annotation]
        while stack:
            item = stack.pop()
            out.append(item)
            stack.extend(typing.get_args(item))
        return out

    fields = [(model.__name__, name, info) for model, name, info in _int_fields() if name not in SEEDS]
    assert len(fields) >= 15, [f"{m}.{n}" for m, n, _ in fields]
    unbounded = [f"{m}.{n}" for m, n, info in fields if not upper(info) and n not in BOUNDED_ELSEWHERE]
    assert not unbounded, unbounded
    unstated = [f"{m}.{n}" for m, n, info in fields if upper(info)
                and f"{max(upper(info)):,}" not in (info.description or "") and str(max(upper(info))) not in (info.description or "")]
    assert not unstated, unstated


def test_count_hyperparameters_are_bounded_on_every_value_they_can_draw():
    from pipeline.manifest import HYPERPARAMETER_MAXIMA, Hyperparameters

    for name, most in HYPERPARAMETER_MAXIMA.items():
        Hyperparameters.model_validate({name: {"int_range": [1, most]}})
        for value in (most + 1, {"int_range": [1, most + 1]}, {"choice": [1, most + 1]}, 0):
            with pytest.raises(ValueError, match=f"1..{most:,}"):
                Hyperparameters.model_validate({name: value})
        assert f"{most:,}" in Hyperparameters.model_fields[name].description


DUPLICATED = """population:
  name: dup
base: {ref: "tiny:shapes-sd", kind: diffusion}
count: 4
data:
  source: shapes
  subsets: {kind: identity_groups, num_groups: 4}
lora:
  rank: 4
  alpha: 4
  rank: 8
  target_modules: [to_q]
hyperparameters: {learning_rate: 0.001, steps: 2}
count: 40
"""


def test_duplicate_keys_are_errors_naming_both_lines():
    problems = _errors(DUPLICATED)
    assert problems == [
        "lora.rank (line 11): duplicate key, first written on line 9; YAML would keep only the last — write it once",
        "count (line 14): duplicate key, first written on line 4; YAML would keep only the last — write it once",
    ], problems


def test_duplicate_keys_in_flow_mappings_lists_and_overrides_are_errors(tiny_manifest_text):
    text = tiny_manifest_text.replace("batch_size: 4", "batch_size: {choice: [4], choice: [8]}")
    problems = _errors(text)
    assert len(problems) == 1 and problems[0].startswith("hyperparameters.batch_size.choice (line "), problems
    text = tiny_manifest_text.replace("scorers:", "scorers:\n  - {name: membership, name: attributes}", 1)
    assert any(p.startswith("scorers[0].name (line") for p in _errors(text))
    with pytest.raises(ManifestError, match="written twice"):
        Manifest.from_text(tiny_manifest_text, overrides=["lora={rank: 4, rank: 8}"])


def test_merge_keys_and_aliases_are_not_duplicates(tiny_manifest_text):
    text = tiny_manifest_text.replace("lora:\n", "defaults: &d {rank: 2, alpha: 4}\nlora:\n  <<: *d\n", 1)
    problems = _errors(text)  # the only problem: the extra top-level key; `rank` given by the merge and again is fine
    assert problems and all("defaults" in p for p in problems), problems


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "manifests").glob("*.yaml")))
def test_the_manifest_kept_as_run_parses_back_to_the_same_manifest(name):
    """With overrides, the stored manifest.yaml is the overridden manifest (the card's canonical hash is its
    hash), headed by the overrides; without them, the file's own text."""
    path = ROOT / "manifests" / f"{name}.yaml"
    text = path.read_text()
    overrides = ["count=7", "seed=3"]
    run = Manifest.from_yaml(path, overrides=overrides)
    kept = run.text_as_run(text, overrides, str(path))
    assert kept.startswith(f"# {path}, run with these overrides") and "#   count=7" in kept
    assert Manifest.from_text(kept).canonical_json() == run.canonical_json()
    assert Manifest.from_yaml(path).text_as_run(text, []) == text
