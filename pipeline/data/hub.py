"""`hf:<dataset id>` and `folder:<path>` data sources, read through `datasets`.

A source is a dataset (one config, or several pooled), a split (`a+b` pools splits) and a
column mapping (`DataColumns` in the manifest) that says which columns are the image, caption,
identity, class, attributes — or, for questions, the question, choices, answer and source.
Unset entries take the defaults of `KNOWN_DATASETS` (the paper's datasets, as their hub cards
define them), else are detected from the dataset's features.

Where the data comes from:
- `hf:<id>`: `datasets.load_dataset(id, config, split=…, revision=…)`, from the cache when it is
  there. When the hub cannot be reached (or `HF_HUB_OFFLINE=1`) and the dataset is not cached,
  `DatasetUnavailableError` names what is missing and the exact `hf download` (huggingface_hub ≥ 1 names its CLI `hf`)
  command, within seconds (a 3 s probe, then an offline load: no retries, no hang).
- `folder:<path>`: a local copy of a hub dataset repo as a download leaves it — parquet, arrow,
  json/csv or image files, with or without its README (with a README that declares `configs`,
  `datasets` reads it as the hub would; without one, splits come from file names
  `{split}-00000-of-00003.parquet` or from folders `{split}/…`, keeping the hub's split names
  such as CelebA's `valid`) — or a `save_to_disk` folder (a DatasetDict, a Dataset, or one per
  config / split).

What a job gets (`HubImageExamples.job_examples`; job k's data is a pure function of (manifest, k)):
- identity groups are the real identities: the identities with at least `min_identity_images`
  images, sorted by value; group g is the g-th. A group's images are the identity's images
  ranked by a hash of (g, image id), the first `group_size` of them — an identity with fewer
  than `group_size` images contributes all of them, never repeated or padded. More groups than
  identities is an error that says how many there are.
- class subsets are the real classes (ClassLabel names, renamed by `label_names`);
  `images_per_class` of each, ranked by a hash of (job seed, image id), as `subsets.class_subset`.
- source subsets are the real sources (ARC: the id prefix, MCAS, TIMSS, …), drawn by
  `subsets.source_subset` from the normalised questions.
Image ids are the `id` column when mapped, else a hash of the image bytes, so no choice depends
on shard or file-listing order. Only the metadata columns are read up front (Arrow, memory
mapped); image bytes are read for the rows a job uses.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artefacts import (
    ArtefactUnavailableError,
    hf_home,
    hub_offline,
    hub_reachable,
    offline_mode,
)
from pipeline.data.base import DataSourceError, ImageExample, QAExample
from pipeline.data.content import DATA_EXTENSIONS, IMAGE_EXTENSIONS, folder_sha256, hub_commit
from pipeline.jobs import unit_draw

GROUP_SEED = 7_919  # as pipeline.data.subsets: identity groups are a property of the data
# The metadata files `datasets`' imagefolder reads beside the images (FolderBasedBuilder.METADATA_FILENAMES):
# a `file_name` column naming each image, plus captions, labels, attributes.
IMAGEFOLDER_METADATA = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
SPLIT_WORDS = {"train", "training", "valid", "validation", "val", "dev", "test", "testing", "eval", "holdout"}
_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}")

# The 40 attribute columns of CelebA (flwrlabs/celeba, config img_align+identity+attr), all bool.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
# frgfm/imagenette's label is a ClassLabel over WordNet ids (its loader's _LABEL_MAP, in this order);
# the names are those its card lists, in the same order.
IMAGENETTE_CLASSES: dict[str, str] = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}


@dataclass(frozen=True)
class KnownDataset:
    """Defaults that make a hub dataset work as its card defines it."""

    config: str | tuple[str, ...] | None
    columns: Mapping[str, Any]
    splits: tuple[str, ...]
    configs: tuple[str, ...] = ()  # every config the repo has (to recognise a downloaded folder)
    revision: str | None = None


KNOWN_DATASETS: dict[str, KnownDataset] = {
    # img_align+identity+attr/{train,valid,test}-0000N-of-000MM.parquet: image, celeb_id (int64), 40 bools.
    "flwrlabs/celeba": KnownDataset(
        config="img_align+identity+attr", configs=("img_align+identity+attr",), splits=("train", "valid", "test"),
        columns={"image": "image", "identity": "celeb_id", "attributes": list(CELEBA_ATTRIBUTES)}),
    # A loading-script repo: `datasets` ≥ 4 reads the hub's parquet conversion (refs/convert/parquet,
    # {config}/{split}/0000.parquet); configs 160px, 320px, full_size; image + label (ClassLabel).
    "frgfm/imagenette": KnownDataset(
        config="full_size", configs=("160px", "320px", "full_size"), splits=("train", "validation"),
        revision="refs/convert/parquet",
        columns={"image": "image", "label": "label", "label_names": dict(IMAGENETTE_CLASSES)}),
    # ARC-{Challenge,Easy}/{train,validation,test}-00000-of-00001.parquet: id, question,
    # choices {text: [...], label: [...]}, answerKey; the source is the id's prefix (MCAS_2000_4_6 → MCAS).
    "allenai/ai2_arc": KnownDataset(
        config=("ARC-Challenge", "ARC-Easy"), configs=("ARC-Challenge", "ARC-Easy"), splits=("train", "validation", "test"),
        columns={"id": "id", "question": "question", "choices": "choices", "answer": "answerKey", "source": "id_prefix"}),
}


class DatasetUnavailableError(ArtefactUnavailableError, DataSourceError):
    """A hub dataset that is neither cached nor reachable; the message says how to fetch it."""


# --------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class DatasetRef:
    """Which dataset: `hf:<id>` or `folder:<path>`, its config(s) and revision, and the column mapping."""

    source: str
    config: tuple[str | None, ...]
    revision: str | None
    columns: Mapping[str, Any]
    known: KnownDataset | None = None

    @property
    def is_hub(self) -> bool:
        return self.source.startswith("hf:")

    @property
    def target(self) -> str:
        return self.source.split(":", 1)[1]

    def describe(self) -> str:
        configs = ", ".join(c for c in self.config if c)
        return self.source + (f" (config {configs})" if configs else "") + (f" @ {self.revision}" if self.revision else "")


def _configs(value: str | Sequence[str] | None) -> tuple[str | None, ...]:
    if value is None:
        return (None,)
    return (value,) if isinstance(value, str) else tuple(value)


def resolve_ref(source: str, config: str | Sequence[str] | None = None, revision: str | None = None,
                columns: Mapping[str, Any] | None = None) -> DatasetRef:
    """The dataset a manifest names, with the known defaults filled in where it leaves them unset."""
    if not source.startswith(("hf:", "folder:")) or not source.split(":", 1)[1]:
        raise DataSourceError(f"{source!r} is not hf:<dataset id> or folder:<path>")
    given = {k: v for k, v in (columns or {}).items() if v is not None}
    known: KnownDataset | None = None
    if source.startswith("hf:"):
        known = KNOWN_DATASETS.get(source[3:])
    else:
        known = _known_for_folder(Path(source[7:]).expanduser(), config)
    if known is not None:
        if config is None:
            config = known.config
            if source.startswith("folder:"):  # a partial download (--include one config): the defaults it holds
                root = Path(source[7:]).expanduser()
                wanted = _configs(known.config)
                present = tuple(c for c in wanted if c and (root / c).is_dir())
                config = (present if len(present) > 1 else present[0]) if present else None
        revision = known.revision if (revision is None and source.startswith("hf:")) else revision
        given = {**known.columns, **given}
    return DatasetRef(source, _configs(config), revision, given, known)


def _known_for_folder(root: Path, config: str | Sequence[str] | None) -> KnownDataset | None:
    """The known dataset a downloaded folder is a copy of, recognised by its config folders."""
    if not root.is_dir():
        return None
    present = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for known in KNOWN_DATASETS.values():
        if known.configs and present and present <= set(known.configs):  # all, or some (a partial download)
            return known
    return None


# --------------------------------------------------------------------------------------
# Loading one split of one config


# The hub probe and offline switch are shared with bases and CLIP weights (pipeline.artefacts).
_offline = hub_offline


def local_copy_dir(ref: DatasetRef) -> str:
    """Where `fetch_command` puts a local copy (relative to the working directory)."""
    return f"datasets/{ref.target.split('/')[-1]}"


def fetch_command(ref: DatasetRef) -> str:
    """The shell command that downloads `ref` as a local copy that `folder:` reads (run where the hub is reachable)."""
    parts = ["hf", "download", ref.target, "--repo-type", "dataset"]  # huggingface_hub ≥ 1 ships `hf` (no huggingface-cli)
    if ref.revision:
        parts += ["--revision", ref.revision]
    for config in ref.config:
        if config:
            parts += ["--include", f"'{config}/*'"]
    parts += ["--local-dir", local_copy_dir(ref)]
    return " ".join(parts)


_hf_home = hf_home


def _unavailable(ref: DatasetRef, why: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"dataset {ref.describe()} is not in the cache (HF_HOME={_hf_home()}) and the hub {why}; "
        f"where the hub is reachable run `{fetch_command(ref)}`, bring that folder here and set "
        f"data.source=folder:{local_copy_dir(ref)} (or run `lol fetch MANIFEST` there with the same HF_HOME, shared or copied)")


def _load_hub(ref: DatasetRef, config: str | None, split: str):
    import datasets

    reachable = hub_reachable()
    why = "is off (HF_HUB_OFFLINE=1)" if offline_mode() else "cannot be reached"
    try:
        with (contextlib.nullcontext() if reachable else _offline()):
            return datasets.load_dataset(ref.target, config, split=split, revision=ref.revision)
    except ValueError as exc:
        raise _bad_split_or_config(ref, config, split, exc) from None
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        if not reachable:
            raise _unavailable(ref, why) from None
        raise DataSourceError(f"cannot load dataset {ref.describe()}: {exc}") from None
    except Exception as exc:  # DatasetNotFoundError and friends
        if not reachable:
            raise _unavailable(ref, why) from None
        raise DataSourceError(f"cannot load dataset {ref.describe()}: {type(exc).__name__}: {exc}") from None


def _bad_split_or_config(ref: DatasetRef, config: str | None, split: str, exc: Exception) -> DataSourceError:
    text = str(exc)
    if "split" in text.lower():
        return DataSourceError(f"dataset {ref.describe()} has no split {split!r}: {text}")
    return DataSourceError(f"dataset {ref.describe()}, config {config!r}: {text}")


def _readme_configs(root: Path) -> list[str] | None:
    """Config names a README's YAML header declares (`configs:`), or None without one."""
    readme = root / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        header = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    configs = header.get("configs") if isinstance(header, dict) else None
    if not isinstance(configs, list):
        return None
    return [str(c.get("config_name", "default")) for c in configs if isinstance(c, dict)]


def _data_files(base: Path) -> dict[str, list[str]]:
    """{split: sorted files} of a folder without a README, keeping the file names' split names."""
    by_split: dict[str, list[str]] = defaultdict(list)
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.name == "README.md":
            continue
        suffix = path.suffix.lower()
        if suffix not in DATA_EXTENSIONS and suffix not in IMAGE_EXTENSIONS:
            continue
        rel = path.relative_to(base).parts
        match = _SHARD.match(path.name)
        dirs = [d for d in rel[:-1] if d != "data"]
        if match:
            split = match["split"]
        elif dirs:
            split = dirs[0]
        else:
            split = "train"
        by_split[split].append(str(path))
    return dict(by_split)


def _builder(files: Sequence[str]) -> str:
    """The `datasets` builder of one split's files. Images with `metadata.csv|jsonl|parquet` beside them
    are one image folder, as `datasets`' imagefolder reads it; elsewhere a metadata file is a data file."""
    kinds = {DATA_EXTENSIONS.get(Path(f).suffix.lower(), "imagefolder") for f in files
             if Path(f).name not in IMAGEFOLDER_METADATA}
    if kinds != {"imagefolder"}:
        kinds = {DATA_EXTENSIONS.get(Path(f).suffix.lower(), "imagefolder") for f in files}
    if len(kinds) != 1:
        raise DataSourceError(f"mixed file types {sorted(kinds)} in one split: {list(files)[:5]}…")
    return kinds.pop()


def folder_configs(root: Path) -> list[str | None]:
    """The configs a downloaded folder holds: README `configs`, else data-holding subfolders
    (a folder of split folders, or `data/`, is one unnamed config)."""
    declared = _readme_configs(root)
    if declared:
        return list(declared)
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs or any(d.lower() in SPLIT_WORDS or d == "data" for d in subdirs):
        return [None]
    return [d for d in subdirs if _data_files(root / d)] or [None]


def _load_folder(ref: DatasetRef, config: str | None, split: str):
    import datasets

    root = Path(ref.target).expanduser()
    if not root.is_dir():
        parent = root.parent
        there = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        raise DataSourceError(f"data folder {root} does not exist; {parent} holds: {', '.join(there) or 'nothing'}")
    base = root / config if config else root
    if config and not base.is_dir() and not _readme_configs(root):
        configs = [c for c in folder_configs(root) if c]
        raise DataSourceError(f"folder {root} has no config {config!r}; configs there: {', '.join(configs) or '(one, unnamed: leave config unset)'}")
    saved = _load_saved(base, split)
    if saved is not None:
        return saved
    if _readme_configs(root):
        try:
            with _datasets_quiet():
                return datasets.load_dataset(str(root), config, split=split, cache_dir=_content_cache_dir(root))
        except ValueError as exc:
            if "split" in str(exc).lower() or "config" in str(exc).lower():
                raise _bad_split_or_config(ref, config, split, exc) from None
            raise _unreadable(ref, root, split, exc) from None
        except Exception as exc:
            raise _unreadable(ref, root, split, exc) from None
    files = _data_files(base)
    if not files:
        raise DataSourceError(f"folder {base} holds no data files (parquet, arrow, json, csv or images); "
                              f"it holds: {', '.join(sorted(p.name for p in base.iterdir())[:20])}")
    if split not in files:
        raise DataSourceError(f"folder {base} has no split {split!r}; its splits: {', '.join(sorted(files))}")
    builder = _builder(files[split])
    try:
        with _datasets_quiet():
            return datasets.load_dataset(builder, data_files={split: files[split]}, split=split)
    except Exception as exc:  # a malformed JSON line, CSV quote or imagefolder metadata: datasets' own errors
        raise _unreadable(ref, base, split, exc) from None


def _content_cache_dir(root: Path) -> str:
    """Where `datasets` prepares a folder read through its README: a cache of the folder's content.
    `datasets` keys that cache by the folder's name and the README's file patterns alone, so a second
    folder of the same name, or edited files, would silently read the first folder's data."""
    import datasets

    return str(Path(datasets.config.HF_DATASETS_CACHE) / "lol-folders" / folder_sha256(root)[:20])


@contextlib.contextmanager
def _datasets_quiet():
    """`datasets` logs a file it cannot parse at ERROR before raising; the raised error becomes our one line."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreadable(ref: DatasetRef, folder: Path, split: str, exc: BaseException) -> DataSourceError:
    """One line for a data file `datasets` cannot read: the folder, the split, and the first line of the
    deepest cause (which names the file, line or column where `datasets` says)."""
    chain: list[BaseException] = [exc]
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    first_line = lambda e: next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)  # noqa: E731
    # the error that says where (a row, a line, a column) if any does, else the deepest one
    cause = next((e for e in chain if re.search(r"\b(row|line|column)\b", first_line(e))), chain[-1])
    why = first_line(cause)
    return DataSourceError(f"{ref.source}: split {split!r} in {folder} cannot be read: {type(cause).__name__}: {why[:300]}; "
                           "valid: parquet/arrow, JSON Lines (one object per line), CSV with a header, or images with a "
                           "metadata.csv/jsonl whose file_name column names each image")


def _load_saved(base: Path, split: str):
    """A `save_to_disk` folder: a DatasetDict, a Dataset, or a folder of one Dataset per split."""
    import datasets

    if (base / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(base))
        if split not in loaded:
            raise DataSourceError(f"saved dataset {base} has no split {split!r}; its splits: {', '.join(loaded)}")
        return loaded[split]
    if (base / "state.json").is_file():
        return datasets.load_from_disk(str(base))
    if (base / split / "state.json").is_file() or (base / split / "dataset_dict.json").is_file():
        return _load_saved(base / split, split)
    return None


def load_split(ref: DatasetRef, config: str | None, split: str):
    """One `datasets.Dataset`: `split` (`a+b` pools splits) of one config, Arrow-backed."""
    import datasets

    parts = [s.strip() for s in split.split("+") if s.strip()]
    if not parts:
        raise DataSourceError(f"empty split name {split!r}")
    loader = _load_hub if ref.is_hub else _load_folder
    loaded = [loader(ref, config, part) for part in parts]
    return loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)


# --------------------------------------------------------------------------------------
# Columns


def _feature_kind(feature: Any) -> str:
    name = type(feature).__name__
    if name == "Value":
        return f"value:{feature.dtype}"
    return name.lower()


def _describe_columns(ds) -> str:
    return ", ".join(f"{name} ({_feature_kind(f)})" for name, f in ds.features.items())


def _require(ds, column: str, role: str, ref: DatasetRef, hint: str = "") -> str:
    if column not in ds.features:
        raise DataSourceError(f"dataset {ref.describe()} has no column {column!r} (mapped as the {role}); "
                              f"its columns: {_describe_columns(ds)}; set data.columns.{role}{hint}")
    return column


def _first_of_kind(ds, kind: str) -> str | None:
    return next((name for name, f in ds.features.items() if type(f).__name__ == kind), None)


def _is_qa(ds, columns: Mapping[str, Any]) -> bool:
    return bool(columns.get("question")) or ("question" in ds.features and "choices" in ds.features)


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


# --------------------------------------------------------------------------------------
# Images


@dataclass
class _ImageTable:
    """One split of one config: the memory-mapped dataset and its metadata columns as Python lists."""

    config: str | None
    ds: Any
    image: str
    ids: list[str] | None  # the id column, if mapped
    labels: list[str] | None
    identities: list[Any] | None
    captions: list[str] | None
    attributes: dict[str, list[Any]]


class HubImageExamples(Sequence[ImageExample]):
    """The images of one split: a sequence that builds `ImageExample`s on demand, plus job selection."""

    def __init__(self, ref: DatasetRef, split: str, tables: list[_ImageTable]):
        self.ref, self.split, self.tables = ref, split, tables
        self._offsets = [0]
        for table in tables:
            self._offsets.append(self._offsets[-1] + len(table.ds))
        self._ids: dict[int, str] = {}
        self._identity_rows: dict[Any, list[int]] | None = None
        self._class_rows: dict[str, list[int]] | None = None

    # ----------------------------------------------------------------- the Sequence

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.example(index)

    def _locate(self, row: int) -> tuple[_ImageTable, int]:
        for t, table in enumerate(self.tables):
            if row < self._offsets[t + 1]:
                return table, row - self._offsets[t]
        raise IndexError(row)

    def _image_cell(self, row: int) -> tuple[bytes | None, str | None]:
        table, local = self._locate(row)
        cell = table.ds.data.column(table.image)[local].as_py()
        if isinstance(cell, dict):
            return cell.get("bytes"), cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            return bytes(cell), None
        return None, str(cell) if cell is not None else None

    def _where(self, row: int) -> str:
        table, local = self._locate(row)
        config = f", config {table.config}" if table.config else ""
        return f"{self.ref.source}{config}, split {self.split!r}, row {local}"

    def _image_bytes(self, row: int) -> tuple[bytes, str | None]:
        data, path = self._image_cell(row)
        if data is None and path:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise DataSourceError(f"image file {path} ({self._where(row)}) cannot be read: {exc.strerror or exc}") from None
        if not data:
            raise DataSourceError(f"{self._where(row)} has no image in column {self._locate(row)[0].image!r}")
        return data, path

    def row_id(self, row: int) -> str:
        """The example id of `row`: its id column, else a hash of its image bytes."""
        if row not in self._ids:
            table, local = self._locate(row)
            self._ids[row] = str(table.ids[local]) if table.ids is not None else content_id(self._image_bytes(row)[0])
        return self._ids[row]

    def example(self, row: int) -> ImageExample:
        table, local = self._locate(row)
        data, path = self._image_bytes(row)
        label = table.labels[local] if table.labels is not None else ""
        caption = table.captions[local] if table.captions is not None else label
        attributes = {name: values[local] for name, values in table.attributes.items()}
        if table.identities is not None:
            attributes.setdefault("identity", str(table.identities[local]))
        on_disk = Path(path) if path and Path(path).is_file() else None  # a stored file name alone is not a file here
        return ImageExample(id=self.row_id(row), image_path=on_disk, caption=caption, label=label,
                            attributes=attributes, image_bytes=data, origin=self._where(row) + (f", file {path}" if path else ""))

    # ----------------------------------------------------------------- identities and classes

    def identity_rows(self) -> dict[Any, list[int]]:
        if self._identity_rows is None:
            if any(t.identities is None for t in self.tables):
                raise DataSourceError(f"identity_groups needs an identity column; {self.ref.describe()} has none mapped "
                                      f"(set data.columns.identity; its columns: {_describe_columns(self.tables[0].ds)})")
            rows: dict[Any, list[int]] = defaultdict(list)
            for t, table in enumerate(self.tables):
                for local, identity in enumerate(table.identities):
                    rows[identity].append(self._offsets[t] + local)
            self._identity_rows = dict(rows)
        return self._identity_rows

    def identities(self) -> list[Any]:
        """The identities that form groups (≥ min_identity_images images), in sorted order: group g is the g-th."""
        minimum = int(self.ref.columns.get("min_identity_images") or 1)
        return sorted((i for i, rows in self.identity_rows().items() if len(rows) >= minimum), key=_sort_key)

    def class_rows(self) -> dict[str, list[int]]:
        if self._class_rows is None:
            if any(t.labels is None for t in self.tables):
                raise DataSourceError(f"class_subsets needs a class column; {self.ref.describe()} has none mapped "
                                      f"(set data.columns.label; its columns: {_describe_columns(self.tables[0].ds)})")
            rows: dict[str, list[int]] = defaultdict(list)
            for t, table in enumerate(self.tables):
                for local, label in enumerate(table.labels):
                    rows[label].append(self._offsets[t] + local)
            self._class_rows = dict(rows)
        return self._class_rows

    # ----------------------------------------------------------------- jobs

    def check_subsets(self, subsets: Any) -> None:
        """Raise DataSourceError unless every job of `subsets` can draw its data from this split."""
        kind = subsets.kind
        if kind == "identity_groups":
            identities = self.identities()
            if subsets.num_groups > len(identities):
                minimum = int(self.ref.columns.get("min_identity_images") or 1)
                raise DataSourceError(
                    f"data.subsets.num_groups is {subsets.num_groups}, but split {self.split!r} of {self.ref.describe()} has "
                    f"{len(identities)} identities with ≥ {minimum} image(s); set num_groups ≤ {len(identities)} "
                    f"(or pool splits, e.g. data.split=train+valid+test)")
        elif kind == "class_subsets":
            known = self.class_rows()
            missing = [c for c in subsets.classes if c not in known]
            if missing:
                raise DataSourceError(f"class(es) {missing} are not in split {self.split!r} of {self.ref.describe()}; "
                                      f"its classes: {', '.join(sorted(known))}")
        else:
            raise DataSourceError(f"{self.ref.describe()} holds images; subsets of kind {kind!r} need questions "
                                  "(identity_groups or class_subsets fit images)")

    def job_examples(self, descriptor: Mapping[str, Any], seed: int) -> list[ImageExample]:
        """The training images of one job (see the module docstring for the rules)."""
        kind = descriptor["kind"]
        if kind == "identity_groups":
            identities = self.identities()
            group = int(descriptor["group"])
            if group >= len(identities):
                raise DataSourceError(f"identity group {group} does not exist: split {self.split!r} of "
                                      f"{self.ref.describe()} has {len(identities)} identities")
            rows = self.identity_rows()[identities[group]]
            ranked = sorted(rows, key=lambda r: (unit_draw(GROUP_SEED, group, f"img:{self.row_id(r)}"), self.row_id(r)))
            return [self.example(r) for r in ranked[: int(descriptor["group_size"])]]
        if kind == "class_subsets":
            known = self.class_rows()
            chosen: list[ImageExample] = []
            for name in descriptor["classes"]:
                if name not in known:
                    raise DataSourceError(f"class {name!r} is not in split {self.split!r} of {self.ref.describe()}; "
                                          f"its classes: {', '.join(sorted(known))}")
                ranked = sorted(known[name], key=lambda r: (unit_draw(seed, 0, f"class:{self.row_id(r)}"), self.row_id(r)))
                chosen += [self.example(r) for r in ranked[: int(descriptor["images_per_class"])]]
            return chosen
        raise DataSourceError(f"{self.ref.describe()} holds images; subsets of kind {kind!r} need questions")


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


def _image_table(ref: DatasetRef, config: str | None, ds) -> _ImageTable:
    columns = ref.columns
    image = columns.get("image") or _first_of_kind(ds, "Image")
    if image is None:
        raise DataSourceError(f"dataset {ref.describe()} has no image column (an Image feature) and no question column; "
                              f"its columns: {_describe_columns(ds)}; set data.columns.image (or .question for QA)")
    _require(ds, image, "image", ref)

    def values(column: str) -> list[Any]:
        return ds.data.column(column).to_pylist()

    ids = values(_require(ds, columns["id"], "id", ref)) if columns.get("id") else None
    labels = None
    label = columns.get("label") or _first_of_kind(ds, "ClassLabel")
    if label:
        _require(ds, label, "label", ref)
        feature = ds.features[label]
        raw = values(label)
        names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
        renames = columns.get("label_names") or {}
        labels = [renames.get(n, n) for n in ((names[v] if names and v is not None else str(v)) for v in raw)]
    identity = columns.get("identity") or ("celeb_id" if "celeb_id" in ds.features else None)
    identities = values(_require(ds, identity, "identity", ref)) if identity else None
    for column, cells in ((identity, identities), (label, labels and [None if v is None else v for v in values(label)])):
        if cells is not None and (blank := next((i for i, v in enumerate(cells) if v is None or str(v).strip() == ""), None)) is not None:
            raise DataSourceError(f"{ref.source}{', config ' + config if config else ''}: row {blank} has no value in column "
                                  f"{column!r} (an empty cell); fill it, or leave that row out of the data")
    captions = [str(c) for c in values(_require(ds, columns["caption"], "caption", ref))] if columns.get("caption") else None
    attribute_names = columns.get("attributes")
    if attribute_names is None:
        attribute_names = [n for n, f in ds.features.items() if _feature_kind(f) == "value:bool"]
    attributes: dict[str, list[Any]] = {}
    for name in attribute_names:
        _require(ds, name, "attributes", ref, " (a list of column names)")
        feature = ds.features[name]
        raw = values(name)
        if type(feature).__name__ == "ClassLabel":
            attributes[name] = [feature.names[v] if v is not None else "" for v in raw]
        else:
            attributes[name] = [int(v) if isinstance(v, bool) else v for v in raw]
    return _ImageTable(config, ds, image, ids, labels, identities, captions, attributes)


# --------------------------------------------------------------------------------------
# Questions


def arc_source(example_id: str) -> str:
    """ARC's source of a question: its id up to the first `_` (MCAS_2000_4_6 → MCAS, Mercury_7175875 → Mercury)."""
    return example_id.split("_", 1)[0]


def _answer_index(answer: Any, labels: Sequence[str] | None, n: int) -> int:
    """The 0-based index of `answer`: a key in `labels`, a letter A.., a 1-based digit string, or a 0-based int."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is a bool, not a key or index")
    if isinstance(answer, int):
        index = answer
    else:
        key = str(answer).strip()
        if labels is not None:
            if key not in labels:
                raise ValueError(f"answer key {key!r} is not one of the choice labels {list(labels)}")
            return list(labels).index(key)
        if len(key) == 1 and key.isalpha():
            index = ord(key.upper()) - ord("A")
        elif key.isdigit():
            index = int(key) - 1
        else:
            raise ValueError(f"answer {key!r} is neither a letter A.. nor a 1-based digit")
    if not 0 <= index < n:
        raise ValueError(f"answer {answer!r} points outside the {n} choices")
    return index


def _qa_examples(ref: DatasetRef, config: str | None, split: str, ds) -> list[QAExample]:
    columns = ref.columns
    question = _require(ds, columns.get("question") or "question", "question", ref)
    choices = _require(ds, columns.get("choices") or "choices", "choices", ref)
    answer = columns.get("answer") or ("answerKey" if "answerKey" in ds.features else "answer")
    _require(ds, answer, "answer", ref)
    id_column = columns.get("id") or ("id" if "id" in ds.features else None)
    if id_column:
        _require(ds, id_column, "id", ref)
    rule = columns.get("source") or ("id_prefix" if id_column else ("config" if config else f"={ref.target}"))
    if rule.startswith("column:"):
        _require(ds, rule[7:], "source", ref, " (column:NAME)")
    elif rule not in ("id_prefix", "config") and not rule.startswith("="):
        raise DataSourceError(f"data.columns.source {rule!r}: use id_prefix, config, column:NAME or =NAME")
    feature = ds.features[answer]
    answer_names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
    out = []
    keep = [c for c in {question, choices, answer, id_column, rule[7:] if rule.startswith("column:") else None} if c]
    for index, row in enumerate(ds.select_columns(keep).to_list()):
        example_id = str(row[id_column]) if id_column else f"{config or ref.target}/{split}/{index}"
        try:
            raw = row[choices]
            if isinstance(raw, Mapping):
                texts, labels = list(raw.get("text") or []), [str(x) for x in raw.get("label") or []] or None
                if labels is not None and len(labels) != len(texts):
                    raise ValueError(f"choices has {len(texts)} texts but {len(labels)} labels")
            elif isinstance(raw, str) and raw.lstrip().startswith("["):  # a CSV cell: the choices as a JSON list
                try:
                    texts, labels = list(json.loads(raw)), None
                except ValueError:
                    raise ValueError(f"choices {raw!r} is not a JSON list of strings (a CSV cell holds them as "
                                     '["first", "second", …])') from None
            elif isinstance(raw, Sequence) and not isinstance(raw, str):
                texts, labels = list(raw), None
            else:
                raise ValueError(f"choices {raw!r} is neither a list, a JSON list in a CSV cell (\"[\"a\", \"b\"]\"), "
                                 "nor {text: [...], label: [...]}")
            value = row[answer]
            if answer_names is not None and isinstance(value, int):
                value = answer_names[value] if labels is not None else value
            position = _answer_index(value, labels, len(texts))
            if rule == "id_prefix":
                source = arc_source(example_id)
            elif rule == "config":
                source = config or ref.target
            elif rule.startswith("column:"):
                if row[rule[7:]] is None or str(row[rule[7:]]).strip() == "":
                    raise ValueError(f"no value in the source column {rule[7:]!r} (an empty cell)")
                source = str(row[rule[7:]])
            else:
                source = rule[1:]
            example = QAExample(id=example_id, source=source, question=str(row[question]).strip(),
                                choices=tuple(str(t).strip() for t in texts), answer=position)
            from pipeline.data.qa import validate_example

            validate_example(example)
        except (ValueError, TypeError, KeyError) as exc:
            raise DataSourceError(f"question {example_id!r} ({ref.source}{', config ' + config if config else ''}, split "
                                  f"{split!r}, row {index}; columns {question!r}/{choices!r}/{answer!r}): {exc}") from None
        out.append(example)
    return out


# --------------------------------------------------------------------------------------
# The source


class HubSource:
    """A `DataSource` over an `hf:` / `folder:` dataset; see the module docstring."""

    def __init__(self, source: str, config: str | Sequence[str] | None = None, revision: str | None = None,
                 columns: Mapping[str, Any] | None = None):
        self.ref = resolve_ref(source, config, revision, columns)
        self.name = source
        self._cache: dict[str, Any] = {}
        self._datasets: dict[str, list[tuple[str | None, Any]]] = {}

    def _configs(self) -> tuple[str | None, ...]:
        if self.ref.config != (None,) or self.ref.is_hub:
            return self.ref.config
        root = Path(self.ref.target).expanduser()
        if not root.is_dir():
            return (None,)
        found = folder_configs(root)
        if len(found) > 1:
            raise DataSourceError(f"folder {root} holds configs {', '.join(c or '?' for c in found)}; choose with data.config "
                                  "(a list pools them)")
        return tuple(found)

    def datasets(self, split: str) -> list[tuple[str | None, Any]]:
        if split not in self._datasets:
            self._datasets[split] = [(c, load_split(self.ref, c, split)) for c in self._configs()]
        return self._datasets[split]

    def splits(self) -> tuple[str, ...]:
        if self.ref.known is not None:
            return self.ref.known.splits
        root = Path(self.ref.target).expanduser()
        if not self.ref.is_hub and root.is_dir():
            config = self._configs()[0]
            return tuple(sorted(_data_files(root / config if config else root)))
        return ("train", "validation", "test")

    def examples(self, split: str):
        """`HubImageExamples` for image datasets (lazy), or a tuple of `QAExample`s for questions."""
        if split not in self._cache:
            loaded = self.datasets(split)
            if _is_qa(loaded[0][1], self.ref.columns):
                pooled = [e for config, ds in loaded for e in _qa_examples(self.ref, config, split, ds)]
                ids = [e.id for e in pooled]
                if len(set(ids)) != len(ids):  # the same id in two configs: qualify every id by its config
                    pooled = [QAExample(f"{c}/{e.id}", e.source, e.question, e.choices, e.answer)
                              for c, ds in loaded for e in _qa_examples(self.ref, c, split, ds)]
                self._cache[split] = tuple(pooled)
            else:
                self._cache[split] = HubImageExamples(self.ref, split, [_image_table(self.ref, c, ds) for c, ds in loaded])
        return self._cache[split]

    def provenance(self, split: str) -> dict[str, Any]:
        """What was read: source, configs, revision, and per config the dataset fingerprint and row count."""
        return {
            "source": self.ref.source,
            "config": [c for c in self.ref.config if c] or None,
            "revision": self.ref.revision,
            "split": split,
            "columns": {k: v for k, v in self.ref.columns.items() if k != "label_names"},
            "fingerprints": {c or "default": getattr(ds, "_fingerprint", None) for c, ds in self.datasets(split)},
            "num_rows": {c or "default": len(ds) for c, ds in self.datasets(split)},
            "content": self.content(),
        }

    def content(self) -> dict[str, str | None]:
        """{config: what identifies its bytes} (`pipeline.data.content`): a folder's sha256, a hub
        dataset's commit (None where the cache does not record it)."""
        from pipeline.artefacts import hub_cache_dir
        if self.ref.is_hub:
            commit = hub_commit(self.ref.target, self.ref.revision, hub_cache_dir())
            return {c or "default": commit and f"commit:{commit}" for c in self._configs()}
        root = Path(self.ref.target).expanduser()
        return {c or "default": "sha256:" + folder_sha256(root / c if c and (root / c).is_dir() else root)
                for c in self._configs()}


@functools.lru_cache(maxsize=8)
def _cached_source(source: str, config_json: str, revision: str | None, columns_json: str) -> HubSource:
    return HubSource(source, json.loads(config_json), revision, json.loads(columns_json))


def hub_source(source: str, config: str | Sequence[str] | None = None, revision: str | None = None,
               columns: Mapping[str, Any] | None = None) -> HubSource:
    """A `HubSource`, shared within the process (a worker's trainer and scorers read the data once)."""
    config_value = list(config) if isinstance(config, (list, tuple)) else config
    return _cached_source(source, json.dumps(config_value), revision, json.dumps(dict(columns or {}), sort_keys=True))


__all__ = ["CELEBA_ATTRIBUTES", "DatasetUnavailableError", "HubImageExamples", "HubSource", "IMAGENETTE_CLASSES",
           "KNOWN_DATASETS", "arc_source", "fetch_command", "hub_source", "resolve_ref"]

