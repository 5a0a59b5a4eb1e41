"""Hub artefacts offline: a base, dataset or CLIP checkpoint that is neither cached nor reachable is one
line (what, HF_HOME, the `hf download` command) and exit 2 within seconds; a cached one loads offline;
`lol fetch MANIFEST [--dry-run]` lists / fetches everything a manifest needs and fails cleanly here.
Plus the leftovers: `mixed_precision=no` as an override, data fingerprints in the card and in score provenance.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from hub_standins import write_arc, write_celeba

from pipeline.artefacts import ArtefactUnavailableError, base_files
from pipeline.bases import BaseModelError
from pipeline.bases.loading import load_diffusion_pipeline, resolve_base
from pipeline.card import _data_lines
from pipeline.fetch import manifest_artefacts
from pipeline.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
FAKE_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def cache_repo(repo: str, source: Path | None = None) -> Path:
    """`repo` in $HF_HOME/hub as `hf download` leaves it (refs/main → snapshots/<commit>/), holding a copy of `source`."""
    root = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / FAKE_COMMIT
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(FAKE_COMMIT)
    if source is not None:
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
    return snapshot


def one_error_line(err: str) -> str:
    """The one `error:` line of a command's stderr (datasets' progress bars aside)."""
    lines = [line for line in err.strip().splitlines() if line.strip() and "examples/s]" not in line and "ba/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ bases


def test_an_uncached_base_offline_is_one_line_with_the_download_command():
    with pytest.raises(ArtefactUnavailableError) as info:
        resolve_base({"ref": "CompVis/stable-diffusion-v1-4", "revision": "main", "kind": "diffusion"}, store=None)
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and f"HF_HOME={os.environ['HF_HOME']}" in message
    assert "`hf download CompVis/stable-diffusion-v1-4 --revision main --include model_index.json" in message
    assert "StableDiffusionPipeline-compatible" not in message


def test_a_cached_base_loads_offline_from_its_snapshot(random_sd):
    snapshot = cache_repo("lol-test/random-sd", Path(random_sd))
    base = {"ref": "lol-test/random-sd", "revision": "main", "kind": "diffusion"}
    assert resolve_base(base, store=None) == (str(snapshot), None)
    pipe = load_diffusion_pipeline(base, store=None)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert base_files("lol-test/random-sd", "main", "diffusion").cached() == str(snapshot)


def test_a_partly_cached_base_says_so():
    snapshot = cache_repo("lol-test/partial-sd")
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(ArtefactUnavailableError, match="only partly in the cache"):
        load_diffusion_pipeline({"ref": "lol-test/partial-sd", "revision": None, "kind": "diffusion"}, store=None)


def test_a_path_like_base_that_does_not_exist_lists_its_folder(tmp_path):
    (tmp_path / "sd-copy").mkdir()
    with pytest.raises(BaseModelError, match="neither an existing folder nor an HF id.*sd-copy"):
        resolve_base({"ref": str(tmp_path / "sd-cpoy"), "revision": None, "kind": "diffusion"}, store=None)


@pytest.mark.parametrize(("manifest", "data", "repo"), [
    ("qwen2-arc", ["data.subsets.sources=[MCAS, TIMSS]"], "Qwen/Qwen2-0.5B"),
    ("celeba-sd14", ["data.subsets.num_groups=3", "data.subsets.group_size=2"], "CompVis/stable-diffusion-v1-4"),
])
def test_lol_finetune_without_the_base_exits_2_in_seconds_with_one_line(run_cli, capsys, tmp_path, manifest, data, repo):
    folder = write_arc(tmp_path / "arc") if manifest == "qwen2-arc" else write_celeba(tmp_path / "celeba")
    capsys.readouterr()  # the stand-in writer's progress bars
    started = time.perf_counter()
    code, _, err = run_cli("finetune", MANIFESTS / f"{manifest}.yaml", f"data.source=folder:{folder}", *data,
                           "--limit", "1", "--store", tmp_path / "store")
    assert code == 2 and time.perf_counter() - started < 60  # seconds of work on a shared CPU, no network waits
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in err, err
    # every missing artefact, one line each, the base first (the scorers' hub benchmark / CLIP follow)
    assert f"base {repo} @ main is not in the cache" in lines[0] and f"`hf download {repo} --revision main" in lines[0]
    assert len(lines) == 2 and ("benchmark hf:allenai/ai2_arc" in lines[1] or "clip ViT-B-16" in lines[1]), lines
    assert not (tmp_path / "store" / "populations" / manifest / "jobs").exists() or \
        not any((tmp_path / "store" / "populations" / manifest / "jobs").rglob("record.json"))


def test_lol_finetune_with_nothing_cached_exits_2_with_one_line_per_artefact(run_cli, tmp_path):
    code, _, err = run_cli("finetune", MANIFESTS / "celeba-sd14.yaml", "--limit", "1", "--store", tmp_path / "store")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and [line.split()[1] for line in lines] == ["base", "dataset", "clip"], err
    assert "dataset hf:flwrlabs/celeba" in lines[1] and "hf download flwrlabs/celeba --repo-type dataset" in lines[1]
    assert not (tmp_path / "store" / "populations").exists()


def test_lol_run_checks_hub_artefacts_before_any_task_one_line_each(run_cli, capsys, tmp_path):
    arc = write_arc(tmp_path / "arc")
    capsys.readouterr()
    code, _, err = run_cli("run", MANIFESTS / "qwen2-arc.yaml", f"data.source=folder:{arc}", "count=1",
                           "--store", tmp_path / "store")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 2, err
    assert errors[0].startswith("error: base Qwen/Qwen2-0.5B @ main is not in the cache")
    assert errors[1].startswith("error: benchmark hf:allenai/ai2_arc") and \
        "scorers[0].benchmark=folder:datasets/ai2_arc and scorers[1].dataset=folder:datasets/ai2_arc" in errors[1]
    assert not (tmp_path / "store").exists()  # a refused run creates no store (no FORMAT.json either)


# ------------------------------------------------------------------ lol fetch

EXPECTED = {
    "celeba-sd14": [
        ("base", "CompVis/stable-diffusion-v1-4 @ main",
         "hf download CompVis/stable-diffusion-v1-4 --revision main --include model_index.json --include '*/*.json'"),
        ("dataset", "hf:flwrlabs/celeba (config img_align+identity+attr)",
         "datasets.load_dataset('flwrlabs/celeba', 'img_align+identity+attr')"),
        ("clip", "ViT-B-16 / openai (timm/vit_base_patch16_clip_224.openai)",
         "hf download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors"),
    ],
    "imagenette-sd14-r32": [
        ("base", "CompVis/stable-diffusion-v1-4 @ main", "hf download CompVis/stable-diffusion-v1-4 --revision main"),
        ("dataset", "hf:frgfm/imagenette (config full_size) @ refs/convert/parquet",
         "datasets.load_dataset('frgfm/imagenette', 'full_size', revision='refs/convert/parquet')"),
    ],
    "qwen2-arc": [
        ("base", "Qwen/Qwen2-0.5B @ main", "hf download Qwen/Qwen2-0.5B --revision main --include '*.json' --include '*.safetensors'"),
        ("dataset", "hf:allenai/ai2_arc (config ARC-Challenge, ARC-Easy)",
         "datasets.load_dataset('allenai/ai2_arc', 'ARC-Challenge'); datasets.load_dataset('allenai/ai2_arc', 'ARC-Easy')"),
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fetch_dry_run_lists_what_each_paper_manifest_needs(run_cli, name):
    code, out, err = run_cli("fetch", MANIFESTS / f"{name}.yaml", "--dry-run")
    assert code == 0 and not err.strip(), err
    lines = out.splitlines()
    assert lines[0].startswith(f"would fetch what {name} needs into the cache (HF_HOME=")
    for kind, what, how in EXPECTED[name]:
        row = next(i for i, line in enumerate(lines) if line.split()[:3] == ["would", "fetch", kind])
        assert what in lines[row] and how in lines[row + 1], (lines[row], lines[row + 1])
    assert sum(line.startswith("  would fetch") for line in lines) == len(EXPECTED[name])


def test_qwen2_arc_fetches_arc_once_for_data_benchmark_and_eval():
    artefacts = manifest_artefacts(Manifest.from_yaml(MANIFESTS / "qwen2-arc.yaml"))
    assert [a.kind for a in artefacts] == ["base", "dataset"]
    assert artefacts[1].used_by == ["data.source", "scorers[0].benchmark", "scorers[1].dataset"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fetch_where_the_hub_is_off_fails_cleanly_one_line_per_artefact(run_cli, name):
    started = time.perf_counter()
    code, out, err = run_cli("fetch", MANIFESTS / f"{name}.yaml")
    assert code == 2 and time.perf_counter() - started < 60
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == len(EXPECTED[name]) and all(e.startswith("error: ") for e in errors) and "Traceback" not in err
    for (kind, what, _), line in zip(EXPECTED[name], errors):
        assert line.startswith(f"error: {kind} {what} is not in the cache") and "HF_HUB_OFFLINE=1" in line
    assert sum(line.split()[:1] == ["missing"] for line in out.splitlines()) == len(EXPECTED[name])


def test_fetch_reports_cached_and_local_artefacts_and_exits_0(run_cli, random_sd, tmp_path):
    cache_repo("lol-test/random-sd", Path(random_sd))
    arc = write_arc(tmp_path / "arc")
    code, out, err = run_cli("fetch", MANIFESTS / "celeba-sd14.yaml", "base.ref=lol-test/random-sd",
                             f"data.source=folder:{arc}", "data.subsets.num_groups=1", "scorers=[]")
    assert code == 0, err
    assert "cached      base      lol-test/random-sd @ main" in out and "local       dataset   folder:" in out
    code, out, _ = run_cli("fetch", MANIFESTS / "tiny-shapes.yaml", "--dry-run")
    assert code == 0 and "local       base      tiny:shapes-sd" in out and "  would fetch" not in out


# ------------------------------------------------------------------ leftovers


@pytest.mark.parametrize(("override", "expected"), [
    ("hyperparameters.mixed_precision=no", "no"),
    ("hyperparameters.mixed_precision='no'", "no"),
    ("hyperparameters.mixed_precision={choice: [no, bf16]}", ["no", "bf16"]),
])
def test_mixed_precision_no_as_an_override_means_no(override, expected):
    m = Manifest.from_yaml(MANIFESTS / "qwen2-arc.yaml", overrides=[override])
    value = m.hyperparameters.mixed_precision
    assert (value.choice if hasattr(value, "choice") else value) == expected


def test_card_names_the_datas_source_revision_and_fingerprints():
    m = Manifest.from_yaml(MANIFESTS / "celeba-sd14.yaml")
    provenance = {"source": "hf:flwrlabs/celeba", "config": ["img_align+identity+attr"], "revision": "abc123", "split": "train",
                  "fingerprints": {"img_align+identity+attr": "f00dfeed"}, "num_rows": {"img_align+identity+attr": 162770}}
    (line,) = _data_lines(m, [(provenance, 3)])
    assert "`hf:flwrlabs/celeba` config img_align+identity+attr, revision `abc123`" in line
    assert "img_align+identity+attr: `f00dfeed` (162770 rows)" in line
    assert _data_lines(Manifest.from_yaml(MANIFESTS / "celeba-sd14.yaml", overrides=["data.source=shapes"]), []) == \
        ["- data: `shapes`, split `train` (built in)"]


def test_benchmark_fingerprint_is_in_the_scorers_provenance(tmp_path):
    from pipeline.score.lm_scorers import EvalLossScorer, McAccuracyScorer

    arc = f"folder:{write_arc(tmp_path / 'arc')}"
    m = Manifest.from_yaml(MANIFESTS / "qwen2-arc.yaml", overrides=[
        f"scorers=[{{name: mc_accuracy, benchmark: '{arc}', split: test, limit: 4}}, {{name: eval_loss, dataset: '{arc}'}}]"])
    mc, loss = McAccuracyScorer(m.scorers[0]).provenance(), EvalLossScorer(m.scorers[1]).provenance()
    assert mc["dataset"]["source"] == arc and mc["dataset"]["split"] == "test" and mc["dataset"]["limit"] == 4
    assert set(mc["dataset"]["fingerprints"]) == {"ARC-Challenge", "ARC-Easy"} and all(mc["dataset"]["fingerprints"].values())
    assert loss["dataset"]["split"] == "validation" and "transformers" in mc["versions"]
