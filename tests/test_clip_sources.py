"""clip_score's CLIP from anywhere open_clip loads it: a name with a local .safetensors checkpoint,
`local-dir:`, `hf-hub:` (from the hub cache, offline), a pretrained tag; and one-line errors when the
weights are missing (offline, not cached), pickled, or named wrong.

A tiny open_clip config (`TINY_CFG`, registered with open_clip.add_model_config) stands in for a real
architecture; the exact ViT-B-16 round trip (random weights → file → loaded back) is `slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from pipeline.artefacts import ArtefactUnavailableError
from pipeline.manifest import Manifest, ManifestError
from pipeline.score.clip_score import clip_provenance, clip_ref, load_clip

TINY_NAME = "lol-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(model, state dict) of the tiny config with random weights, registered under TINY_NAME."""
    folder = tmp_path_factory.mktemp("clip-config")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / f"{TINY_NAME}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME).eval()
    return model, {k: v.contiguous() for k, v in model.state_dict().items()}


def check_same_clip(loaded, reference) -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer(TINY_NAME)(["a photo", "a drawing"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), reference.encode_image(images), atol=1e-6)
        assert torch.allclose(loaded.encode_text(tokens), reference.encode_text(tokens), atol=1e-6)


def write_hub_cache(repo: str, files: dict[str, bytes]) -> Path:
    """`repo` in the hub cache under $HF_HOME/hub as a download leaves it (refs/main → snapshots/<commit>/)."""
    import os

    root = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(FAKE_COMMIT)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_a_model_name_with_a_local_safetensors_checkpoint(tiny_clip, tmp_path):
    model, state = tiny_clip
    checkpoint = tmp_path / "clip.safetensors"
    save_file(state, str(checkpoint))
    assert clip_ref(TINY_NAME, str(checkpoint)).kind == "file"
    loaded, preprocess, tokenizer = load_clip(TINY_NAME, str(checkpoint), store=None)
    check_same_clip(loaded, model)
    assert preprocess.transforms[0].size == 32 and tokenizer(["x"]).shape == (1, 77)
    provenance = clip_provenance(TINY_NAME, str(checkpoint))
    assert provenance["checkpoint"] == "clip.safetensors" and len(provenance["sha256"]) == 64


def test_local_dir_in_open_clips_hub_layout(tiny_clip, tmp_path):
    model, state = tiny_clip
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    save_file(state, str(folder / "open_clip_model.safetensors"))
    loaded, _, _ = load_clip(f"local-dir:{folder}", None, store=None)
    check_same_clip(loaded, model)
    assert clip_provenance(f"local-dir:{folder}", None)["checkpoint"] == "open_clip_model.safetensors"


def test_hf_hub_model_loads_from_the_cache_offline(tiny_clip, tmp_path):
    model, state = tiny_clip
    checkpoint = tmp_path / "w.safetensors"
    save_file(state, str(checkpoint))
    write_hub_cache("lol-test/tiny-clip", {
        "open_clip_config.json": json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}).encode(),
        "open_clip_model.safetensors": checkpoint.read_bytes()})
    loaded, _, _ = load_clip("hf-hub:lol-test/tiny-clip", None, store=None)
    check_same_clip(loaded, model)


def test_hf_hub_model_not_cached_offline_is_one_line_with_the_download_command():
    with pytest.raises(ArtefactUnavailableError) as info:
        load_clip("hf-hub:lol-test/absent-clip", None, store=None)
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and "HF_HOME=" in message
    assert "`hf download lol-test/absent-clip open_clip_config.json open_clip_model.safetensors`" in message


def test_the_papers_vit_b_16_openai_offline_names_the_hub_file():
    ref = clip_ref("ViT-B-16", "openai")
    assert ref.kind == "tag" and ref.quick_gelu  # openai weights were trained with QuickGELU
    assert ref.files.repo_id == "timm/vit_base_patch16_clip_224.openai"
    with pytest.raises(ArtefactUnavailableError) as info:
        load_clip("ViT-B-16", "openai", store=None)
    message = str(info.value)
    assert "\n" not in message and "CLIP weights ViT-B-16 / openai" in message
    assert "`hf download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors`" in message


@pytest.mark.parametrize(("model", "pretrained", "expected"), [
    ("ViT-B-16", "no-such-tag", "neither a tag of ViT-B-16 (openai, laion400m_e31"),
    ("ViT-B-16", "weights/missing.safetensors", "checkpoint file 'weights/missing.safetensors' does not exist"),
    ("ViT-B-61", None, "not an open_clip model name (did you mean ViT-B-16"),
    ("local-dir:/no/such/folder", None, "needs a folder with open_clip_config.json"),
])
def test_bad_clip_names_say_what_would_be_valid(model, pretrained, expected):
    with pytest.raises(ValueError) as info:
        clip_ref(model, pretrained)
    assert expected in str(info.value)


def test_pickle_checkpoints_are_refused(tiny_clip, tmp_path):
    checkpoint = tmp_path / "clip.pt"
    torch.save(tiny_clip[1], checkpoint)
    with pytest.raises(ValueError, match="not a .safetensors file; pickle checkpoints"):
        clip_ref(TINY_NAME, str(checkpoint))


def test_manifest_refuses_pretrained_beside_a_model_that_carries_its_weights():
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ManifestError, match="carries its weights"):
        Manifest.from_yaml(root / "manifests" / "celeba-sd14.yaml",
                           overrides=["scorers=[{name: clip_score, model: 'hf-hub:org/clip', pretrained: openai, prompts: paper33}]"])


@pytest.mark.slow
def test_vit_b_16_with_random_weights_round_trips_through_a_local_file(tmp_path):
    """The paper's architecture, random weights saved to a file, loaded back by the local-path route."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval()
    checkpoint = tmp_path / "vit-b-16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    loaded, preprocess, _ = load_clip("ViT-B-16", str(checkpoint), store=None)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5)
    assert preprocess.transforms[0].size == 224
