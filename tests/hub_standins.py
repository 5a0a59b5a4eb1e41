"""Stand-in copies of the paper's hub datasets, in their exact hub layouts and schemas, but tiny.

- `write_celeba(root)`: flwrlabs/celeba as `huggingface-cli download flwrlabs/celeba --repo-type
  dataset --local-dir root` leaves it: README.md (its `configs` / `dataset_info` header) and
  `img_align+identity+attr/{train-0000N-of-00002,valid-00000-of-00001,test-00000-of-00001}.parquet`,
  features image (Image), celeb_id (int64) and the 40 bool attribute columns.
- `write_imagenette(root)`: frgfm/imagenette's parquet conversion (`--revision refs/convert/parquet`):
  `{160px,320px,full_size}/{train,validation}/0000.parquet`, no README, features image (Image) and
  label (ClassLabel over the WordNet ids of its loader's _LABEL_MAP).
- `write_arc(root)`: allenai/ai2_arc: README.md and `ARC-{Challenge,Easy}/{train,validation,test}-00000-of-00001.parquet`,
  features id, question, choices {text: [string], label: [string]}, answerKey; ids carry ARC's
  real source prefixes (Mercury_, MCAS_, TIMSS_, NYSEDREGENTS_, …), keys are letters, some digits.
Every image is a small PNG with its own colour (distinct bytes).
"""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from pipeline.data.hub import CELEBA_ATTRIBUTES, IMAGENETTE_CLASSES

CELEBA_CONFIG = "img_align+identity+attr"
# identity -> number of images in the train split (group_size in the tests is 4)
CELEBA_TRAIN_IDENTITIES = {101: 6, 7: 5, 55: 4, 3: 2, 900: 1}
ARC_SOURCES = ("Mercury", "MCAS", "TIMSS", "NYSEDREGENTS", "ACTAAP", "AKDE&ED", "LEAP")


def png(seed: int, size: int = 16) -> bytes:
    """A PNG of one colour chosen by `seed` (distinct bytes for distinct seeds < 2**24)."""
    colour = (seed * 67 % 256, seed * 151 % 256, (seed // 7) * 29 % 256)
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), colour).save(buffer, format="PNG", optimize=False)
    pixels = PILImage.new("RGB", (size, size), colour)
    pixels.putpixel((0, 0), (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256))  # distinct even when colours repeat
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_readme(root: Path, header: dict) -> None:
    (root / "README.md").write_text("---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n# stand-in\n")


def celeba_features() -> Features:
    return Features({"image": Image(), "celeb_id": Value("int64"), **{a: Value("bool") for a in CELEBA_ATTRIBUTES}})


def _celeba_rows(identities: dict[int, int], start: int) -> dict[str, list]:
    rows: dict[str, list] = {"image": [], "celeb_id": [], **{a: [] for a in CELEBA_ATTRIBUTES}}
    n = start
    for identity, count in identities.items():
        for _ in range(count):
            rows["image"].append({"bytes": png(n), "path": f"{n:06d}.jpg"})
            rows["celeb_id"].append(identity)
            for j, attribute in enumerate(CELEBA_ATTRIBUTES):
                rows[attribute].append(bool((n + j + (identity if attribute == "Male" else 0)) % 2))
            n += 1
    return rows


def write_celeba(root: Path, readme: bool = True) -> Path:
    folder = root / CELEBA_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    features = celeba_features()
    train = Dataset.from_dict(_celeba_rows(CELEBA_TRAIN_IDENTITIES, 0), features=features)
    half = len(train) // 2  # two shards; identity 7's images straddle them
    train.select(range(half)).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    train.select(range(half, len(train))).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    Dataset.from_dict(_celeba_rows({2001: 3, 2002: 2}, 1000), features=features).to_parquet(str(folder / "valid-00000-of-00001.parquet"))
    Dataset.from_dict(_celeba_rows({3001: 2}, 2000), features=features).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    if readme:
        _write_readme(root, {
            "license": "other",
            "dataset_info": {"config_name": CELEBA_CONFIG, "features": [
                {"name": "image", "dtype": "image"}, {"name": "celeb_id", "dtype": "int64"},
                *({"name": a, "dtype": "bool"} for a in CELEBA_ATTRIBUTES)]},
            "configs": [{"config_name": CELEBA_CONFIG, "data_files": [
                {"split": s, "path": f"{CELEBA_CONFIG}/{s}-*"} for s in ("train", "valid", "test")]}],
        })
    return root


IMAGENETTE_WNIDS = tuple(IMAGENETTE_CLASSES)
IMAGENETTE_TRAIN_PER_CLASS = 3


def write_imagenette(root: Path) -> Path:
    features = Features({"image": Image(), "label": ClassLabel(names=list(IMAGENETTE_WNIDS))})
    for c, config in enumerate(("160px", "320px", "full_size")):
        for s, (split, per_class) in enumerate((("train", IMAGENETTE_TRAIN_PER_CLASS), ("validation", 1))):
            rows = {"image": [], "label": []}
            for label in range(len(IMAGENETTE_WNIDS)):
                for k in range(per_class):
                    rows["image"].append({"bytes": png(10_000 * (c + 1) + 1000 * s + 10 * label + k), "path": None})
                    rows["label"].append(label)
            folder = root / config / split
            folder.mkdir(parents=True, exist_ok=True)
            Dataset.from_dict(rows, features=features).to_parquet(str(folder / "0000.parquet"))
    return root


def arc_features() -> Features:
    return Features({"id": Value("string"), "question": Value("string"),
                     "choices": {"text": List(Value("string")), "label": List(Value("string"))},
                     "answerKey": Value("string")})


def _arc_rows(config: str, split: str, n: int) -> dict[str, list]:
    rows: dict[str, list] = {"id": [], "question": [], "choices": [], "answerKey": []}
    for i in range(n):
        source = ARC_SOURCES[i % len(ARC_SOURCES)]
        digits = i % 5 == 4  # a few rows use labels 1..4, as some ARC rows do
        labels = ["1", "2", "3", "4"] if digits else ["A", "B", "C", "D"]
        rows["id"].append(f"{source}_{config[4:]}_{split}_{i}" if source != "LEAP" else f"LEAP__{split}_{config[4:]}{i}")
        rows["question"].append(f"Which {config} {split} answer fits question {i}?")
        rows["choices"].append({"text": [f"option {k} of {i}" for k in range(4)], "label": labels})
        rows["answerKey"].append(labels[i % 4])
    return rows


def write_arc(root: Path) -> Path:
    sizes = {"train": 28, "validation": 8, "test": 10}
    for config in ("ARC-Challenge", "ARC-Easy"):
        folder = root / config
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in sizes.items():
            Dataset.from_dict(_arc_rows(config, split, n), features=arc_features()).to_parquet(
                str(folder / f"{split}-00000-of-00001.parquet"))
    _write_readme(root, {
        "license": "cc-by-sa-4.0",
        "configs": [{"config_name": c, "data_files": [{"split": s, "path": f"{c}/{s}-*"} for s in sizes]}
                    for c in ("ARC-Challenge", "ARC-Easy")],
    })
    return root
