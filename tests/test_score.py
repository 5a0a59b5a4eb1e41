"""Scorers on real LoRAs: data-derived labels, CLIP score, provenance, resumption, scorer ids."""

from __future__ import annotations

import pytest
from conftest import ROOT

from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import finetune_population
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from pipeline.score.data_labels import parse_attribute_test
from pipeline.score.runner import score_population
from storage import Store

SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"
MEMBERSHIP = ROOT / "manifests" / "tiny-shapes-membership.yaml"


@pytest.fixture(scope="module")
def trained(random_sd, tmp_path_factory):
    """A store with 3 finetuned LoRAs of the random SD base (1 step each)."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    overrides = [f"base.ref={random_sd}", "count=3", "hyperparameters.steps=1", "hyperparameters.batch_size=1",
                 "scorers[0]=null"]
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides[:-1])
    summary = finetune_population(manifest, store, DiffusionTrainer)
    assert len(summary.trained) == 3
    return store, overrides[:-1]


def clip_overrides(settings: str) -> list[str]:
    return [f"scorers=[{{name: clip_score, model: 'tiny:shapes-clip', prompts: ['a red circle', 'a blue square'], "
            f"steps: 2, guidance_scale: 2.0, batch_size: 2, size: smoke, {settings}}}, "
            "{name: attributes, attributes: [shape=circle, color=red|yellow|brown]}]"]


def test_attribute_tests_parse():
    assert parse_attribute_test("color=red|blue") == ("color", frozenset({"red", "blue"}))
    assert parse_attribute_test("Male") == ("Male", None)
    with pytest.raises(ValueError, match="NAME=V1"):
        parse_attribute_test("color=")


def test_attributes_and_clip_score_are_written_with_provenance_and_resume(trained):
    store, overrides = trained
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides("seed: 0"))
    summary = score_population(manifest, store)
    assert not summary.failed, summary.failed
    population = store.population("tiny-shapes")
    clip_id, attr_id = (scorer_id(s) for s in manifest.scorers)
    for job in expand(manifest):
        clip = population.read_score(job.job_id, clip_id)
        assert clip["scorer_id"] == clip_id and clip["settings"]["steps"] == 2 and "torch" in clip["versions"]
        assert 0.0 <= clip["labels"]["clip_score"] <= 100.0
        attrs = population.read_score(job.job_id, attr_id)["labels"]
        assert set(attrs) == {"shape=circle", "color=red|yellow|brown"} and set(attrs.values()) <= {0, 1}
    again = score_population(manifest, store)
    assert again.scored == {clip_id: 0, attr_id: 0} and again.skipped == {clip_id: 3, attr_id: 3}


def test_new_settings_score_into_a_new_id_and_keep_the_old(trained):
    store, overrides = trained
    first = Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides("seed: 0"))
    second = Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides("seed: 1"))
    assert scorer_id(first.scorers[0]) != scorer_id(second.scorers[0])
    assert scorer_id(first.scorers[1]) == scorer_id(second.scorers[1])
    score_population(first, store, only=["clip_score"])
    score_population(second, store, only=["clip_score"])
    population = store.population("tiny-shapes")
    job_id = next(expand(first)).job_id
    assert population.has_score(job_id, scorer_id(first.scorers[0])) and population.has_score(job_id, scorer_id(second.scorers[0]))


def test_clip_score_of_a_lora_is_reproducible_and_differs_from_the_base(trained):
    from pipeline.score.clip_score import ClipScoreScorer

    store, overrides = trained
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides("seed: 0"))
    scorer = ClipScoreScorer(manifest.scorers[0])
    scorer.setup(manifest, store)
    job = next(expand(manifest))
    adapter = store.local_path(store.population("tiny-shapes").job_rel(job.job_id, "adapter"))
    base_keys = set(scorer.pipe.unet.state_dict())
    base_images = scorer.generate(None)
    with_lora = scorer.generate(adapter)
    assert set(scorer.pipe.unet.state_dict()) == base_keys  # the LoRA layers are gone again, not just disabled
    assert (scorer.generate(adapter) == with_lora).all()
    assert (scorer.generate(None) == base_images).all()
    assert abs(base_images - with_lora).max() > 0


def test_membership_labels_are_the_job_classes():
    from pipeline.score import make_scorer

    manifest = Manifest.from_yaml(MEMBERSHIP, overrides=["count=5"])
    scorer = make_scorer(manifest.scorers[0])
    scorer.setup(manifest, None)
    for job in expand(manifest):
        labels = scorer.score(job)
        assert len(labels) == 10 and {c for c, v in labels.items() if v} == set(job.spec.data["classes"])


def test_unknown_attribute_is_refused_before_scoring(trained):
    from pipeline.data.base import DataSourceError
    from pipeline.score import make_scorer

    manifest = Manifest.from_yaml(SHAPES, overrides=["scorers=[{name: attributes, attributes: [hue=red]}]"])
    with pytest.raises(DataSourceError, match="known: .*color"):
        make_scorer(manifest.scorers[0]).setup(manifest, None)


def test_sources_labels_and_a_mismatched_subset_kind():
    from pipeline.score import make_scorer

    arc = Manifest.from_yaml(ROOT / "manifests" / "tiny-arc.yaml", overrides=["count=4"])
    scorer = make_scorer(arc.scorers[2])
    scorer.setup(arc, None)
    for job in expand(arc):
        labels = scorer.score(job)
        assert len(labels) == 6 and {s for s, v in labels.items() if v} == set(job.spec.data["sources"])
    with pytest.raises(ValueError, match="needs data.subsets.kind: source_subsets"):
        make_scorer(arc.scorers[2]).setup(Manifest.from_yaml(SHAPES), None)


def test_adapter_round_trip_reproduces_the_scored_images(trained):
    """The stored adapter, loaded with peft's `PeftModel.from_pretrained` and with diffusers'
    `load_lora_adapter`, generates the images the scorer generated (max abs difference ≤ 1e-5)."""
    import numpy as np
    import torch
    from peft import PeftModel

    from pipeline.score.clip_score import ClipScoreScorer

    store, overrides = trained
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides("seed: 3"))
    spec = manifest.scorers[0]
    scorer = ClipScoreScorer(spec, device="cpu")
    scorer.setup(manifest, store)
    job = next(expand(manifest))
    adapter = store.local_path(store.population("tiny-shapes").job_rel(job.job_id, "adapter"))
    scored = scorer.generate(adapter)  # (I, H, W, 3), as the scorer stores labels from

    def generate_with(unet) -> np.ndarray:
        pipe = scorer.pipe
        original, pipe.unet = pipe.unet, unet
        try:
            images = []
            for i, prompt in enumerate(scorer.prompts):
                generator = [torch.Generator().manual_seed(spec.seed + i)]
                images.append(pipe([prompt], num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                                   generator=generator, output_type="np").images)
            return np.concatenate(images)
        finally:
            pipe.unet = original

    base_unet = scorer.pipe.unet
    via_peft = PeftModel.from_pretrained(base_unet, adapter)
    try:
        peft_images = generate_with(via_peft)  # one prompt per call: batching is not what makes it equal
    finally:
        via_peft.unload()
    assert np.abs(peft_images - scored).max() <= 1e-5
    base_unet.load_lora_adapter(str(adapter), weight_name="adapter_model.safetensors", adapter_name="again",
                                prefix="base_model.model")
    try:
        diffusers_images = generate_with(base_unet)
    finally:
        base_unet.unload_lora()
    assert np.abs(diffusers_images - scored).max() <= 1e-5
    assert np.abs(generate_with(base_unet) - scored).max() > 1e-4  # the LoRA (1 step) moved them well past the tolerance


def test_label_statistics_match_a_direct_computation(trained, run_cli, tmp_path):
    import json

    import numpy as np
    from scipy.stats import kendalltau

    from pipeline.label_stats import label_statistics, training_budget

    store, overrides = trained
    extra = ["scorers=[{name: attributes, attributes: [shape=circle, color=red|yellow|brown, size=large]}]"]
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides + extra)
    score_population(manifest, store)
    stats = label_statistics(manifest, store)["labels"]
    population = store.population("tiny-shapes")
    sid = scorer_id(manifest.scorers[0])
    jobs = list(expand(manifest))
    for label in ("shape=circle", "size=large"):
        values = [population.read_score(j.job_id, sid)["labels"][label] for j in jobs]
        s = stats[f"attributes/{label}"]
        assert s["count"] == 3 and s["mean"] == np.mean(values) and np.isclose(s["std"], np.std(values, ddof=1))
        budgets = [training_budget(j.spec.hyperparameters) for j in jobs]
        assert budgets == [j.spec.hyperparameters["learning_rate"] * j.spec.hyperparameters["steps"] for j in jobs]
        if "lr×length" in s["kendall"]:
            assert np.isclose(s["kendall"]["lr×length"]["tau"], kendalltau(budgets, values).statistic, atol=1e-4)
        assert s["distinct"] == len(set(values)) and sum(b["count"] for b in s["by_budget"]) == 3
        assert [h["value"] for h in s["highest"]] == sorted(values, reverse=True)
        assert {h["job_id"]: h["value"] for h in s["highest"]} == {j.job_id: v for j, v in zip(jobs, values)}
        assert all(h["hyperparameters"] == next(j for j in jobs if j.job_id == h["job_id"]).spec.hyperparameters
                   for h in s["highest"])
    circle = [population.read_score(j.job_id, sid)["labels"]["shape=circle"] for j in jobs]
    large = [population.read_score(j.job_id, sid)["labels"]["size=large"] for j in jobs]
    between = stats["attributes/shape=circle"]["kendall"].get("label:attributes/size=large")
    if len(set(circle)) > 1 and len(set(large)) > 1:
        assert np.isclose(between["tau"], kendalltau(circle, large).statistic, atol=1e-4)
    out = tmp_path / "labels.json"
    code, stdout, err = run_cli("bench", "labels", SHAPES, *overrides, *extra, "--store", store.url, "--output", out)
    assert code == 0, err
    assert json.loads(out.read_text())["labels"].keys() == stats.keys()
    code, _, err = run_cli("bench", "labels", SHAPES, *overrides, "--store", tmp_path / "empty")
    assert code == 2 and "no scores stored" in err


def test_budget_curve_is_the_label_mean_per_equal_count_bin_of_the_budget():
    from pipeline.label_stats import budget_curve

    budgets = [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 8.0, 7.0, 9.0, 10.0]
    values = [b * 10 for b in budgets]  # sorted: 10, 20, …, 100
    curve = budget_curve(budgets, values, bins=5)
    assert [c["count"] for c in curve] == [2] * 5
    assert [c["mean"] for c in curve] == [15.0, 35.0, 55.0, 75.0, 95.0]
    assert (curve[0]["budget_min"], curve[-1]["budget_max"]) == (1.0, 10.0)


@pytest.mark.parametrize("rows_per_call", [32, 4], ids=["one-loop", "loop-per-adapter"])
def test_clip_score_cohort_equals_scoring_each_adapter_alone(trained, rows_per_call, monkeypatch):
    from pipeline.score import clip_score
    from pipeline.score.clip_score import ClipScoreScorer

    monkeypatch.setattr(clip_score, "CPU_ROWS_PER_CALL", rows_per_call)
    store, overrides = trained
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides("seed: 0, images_per_prompt: 2"))
    scorer = ClipScoreScorer(manifest.scorers[0])
    scorer.setup(manifest, store)
    jobs = list(expand(manifest))
    population = store.population("tiny-shapes")
    dirs = [store.local_path(population.job_rel(job.job_id, "adapter")) for job in jobs]
    base_keys = set(scorer.pipe.unet.state_dict())
    together = scorer.generate_cohort(dirs)  # (K, I, H, W, 3)
    assert set(scorer.pipe.unet.state_dict()) == base_keys  # the cohort layers are gone again
    alone = [scorer.generate(d) for d in dirs]
    within = max(abs(together[k] - alone[k]).max() for k in range(len(dirs)))
    between = abs(alone[0] - alone[1]).max()  # these LoRAs took one step: their images differ a little
    assert within < 1e-4 and between > 5 * within  # each copy was routed to its own adapter
    scores = scorer.score_cohort(jobs, dirs)
    for job, d, got in zip(jobs, dirs, scores):
        assert got["clip_score"] == pytest.approx(scorer.score(job, d)["clip_score"], abs=1e-3)


@pytest.fixture(scope="module")
def alpha_not_rank(random_sd, tmp_path_factory):
    """Two peft adapters of the random SD UNet with rank 4 and alpha 16 (scale alpha/r = 4), B drawn at
    random so they act without training (alpha = r, as in tiny-shapes, would hide a wrong scale)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("alpha-not-rank")
    unet = UNet2DConditionModel.from_pretrained(random_sd, subfolder="unet")
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = get_peft_model(unet, LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_v"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
        model.save_pretrained(str(root / f"adapter-{seed}"))
        unet = model.unload()
        dirs.append(root / f"adapter-{seed}")
    return dirs


def test_clip_score_alone_applies_alpha_over_rank_as_peft_and_the_cohort_do(random_sd, alpha_not_rank, tmp_path):
    """Scoring one adapter at a time loads it at strength alpha/r: the UNet output equals peft's
    `PeftModel.from_pretrained`, and images and scores equal the cohort route's (which reads alpha/r itself)."""
    import json

    import torch
    from peft import PeftModel

    from pipeline.score.clip_score import ClipScoreScorer

    config = json.loads((alpha_not_rank[0] / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == 4
    manifest = Manifest.from_yaml(SHAPES, overrides=[f"base.ref={random_sd}"] + clip_overrides("seed: 0, images_per_prompt: 2"))
    scorer = ClipScoreScorer(manifest.scorers[0], device="cpu")
    scorer.setup(manifest, Store(str(tmp_path / "store")))
    unet = scorer.pipe.unet
    c = unet.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=generator)
    states = torch.randn(2, 77, c.cross_attention_dim, generator=generator)
    t = torch.tensor([500, 20])
    base_keys = set(unet.state_dict())
    with torch.no_grad():
        base = unet(x, t, states).sample
        via_peft = PeftModel.from_pretrained(unet, alpha_not_rank[0])  # peft reads alpha from adapter_config.json
        try:
            reference = via_peft(x, t, states).sample
        finally:
            via_peft.unload()
        with scorer.adapter_loaded(alpha_not_rank[0]):
            loaded = unet(x, t, states).sample
    assert set(unet.state_dict()) == base_keys
    effect = float((reference - base).abs().max())
    assert effect > 1e-2 and float((loaded - reference).abs().max()) <= 5e-7 * max(1.0, float(reference.abs().max()))

    together = scorer.generate_cohort(alpha_not_rank)  # (K, I, H, W, 3)
    alone = [scorer.generate(d) for d in alpha_not_rank]
    within = max(abs(together[k] - alone[k]).max() for k in range(len(alpha_not_rank)))
    assert within < 1e-4 and abs(alone[0] - scorer.generate(None)).max() > 100 * within
    jobs = [None] * len(alpha_not_rank)
    for d, got in zip(alpha_not_rank, scorer.score_cohort(jobs, alpha_not_rank)):
        assert got["clip_score"] == pytest.approx(scorer.score(None, d)["clip_score"], abs=1e-3)


def test_clip_score_resolution_sets_the_image_side_and_unset_keeps_the_stored_ids(trained, random_sd):
    """`resolution` renders at that side; unset, it is left out of the id, so ids stored before it existed still match."""
    from pipeline.score.clip_score import ClipScoreScorer

    shipped = {m: [scorer_id(s) for s in Manifest.from_yaml(ROOT / "manifests" / f"{m}.yaml").scorers]
               for m in ("tiny-shapes", "celeba-sd14")}
    assert shipped == {"tiny-shapes": ["clip_score-e167248ec6", "attributes-ec8501f208"],  # the ids earlier releases wrote
                       "celeba-sd14": ["clip_score-52cf310df4", "attributes-b93037cd2e"]}
    store, overrides = trained
    unset, small = (Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides(extra)) for extra in ("seed: 0", "seed: 0, resolution: 32"))
    assert scorer_id(unset.scorers[0]) != scorer_id(small.scorers[0])
    scorer = ClipScoreScorer(small.scorers[0], device="cpu")
    scorer.setup(small, store)
    assert scorer.generate().shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        Manifest.from_yaml(SHAPES, overrides=overrides + clip_overrides("resolution: 30"))
