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
