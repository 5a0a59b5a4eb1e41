"""The manifest: one YAML file that fully determines a LoRA population.

Pydantic v2, no torch, so `lol validate` is instant. `Manifest.from_yaml(path)` raises
`ManifestError` listing *every* problem with its YAML path and line number::

    manifests/x.yaml: 2 problems
      lora.rank[2] (line 12): Input should be greater than or equal to 1 (got -3)
      hyperparamters (line 20): unknown key; did you mean 'hyperparameters'?
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from lol_models.names import PREDICTORS
from lol_models.split_rule import PROTOCOL_FRACTIONS
from pipeline.yaml_source import Loc, YamlDuplicateKeyError, YamlSource, YamlSyntaxError, load_yaml
from storage.errors import DomainError

ModelKind = Literal["diffusion", "causal_lm"]

# Built-in bases of the tiny world (DESIGN §6) and the kind of model each is.
TINY_BASES: dict[str, str] = {
    "shapes-sd": "diffusion",
    "shapes-sd-continued": "diffusion",
    "shapes-clip": "clip",
    "qa-lm": "causal_lm",
}
BUILTIN_DATA_SOURCES = ("shapes", "qa", "skills")
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a page of YAML; anything near this size is not one
MAX_SHOWN_PROBLEMS = 50

# Upper bounds of every count a manifest can hold. Each lies far beyond what any real population
# uses (the paper's: 3,000 LoRAs, rank ≤ 32, ≤ 200 steps, 3 predictor seeds), yet turns a slip
# (1e9 for 1e3, a misplaced exponent) into an error at validation instead of a job that never
# finishes or a worker that allocates the machine away.
MAX_COUNT = 10_000_000  # LoRAs in a population; also distinct identity groups
MAX_RANK = 4_096  # the hidden width of the largest bases in use (Llama-3-8B); a LoRA's rank is far smaller
MAX_STEPS = 100_000  # optimiser steps of one LoRA: 500× the paper's 200 (hours per LoRA on SD-1.4)
MAX_EPOCHS = 10_000  # passes over one job's data (ARC populations use 2–4)
MAX_BATCH = 4_096  # examples per step (the largest batch in the shipped manifests is 128)
MAX_ACCUMULATION = 1_024  # micro-batches per optimiser step
MAX_RESOLUTION = 4_096  # image side in pixels (SD-1.x trains at 512, SDXL at 1024)
MAX_LENGTH = 131_072  # tokens per example: the longest context of a Qwen2 model
MAX_GROUP_SIZE = 100_000  # images of one identity group (a CelebA identity has at most 35)
MAX_SUBSET_EXAMPLES = 1_000_000  # images per class / examples per source drawn into one job
MAX_LEARN_SEEDS = 100  # predictor trainings per (predictor, target); the paper reports 3–5 seeds
MAX_LEARN_EPOCHS = 100_000  # predictor epochs (default 50)
MAX_HIDDEN = 16_384  # predictor width (the paper's predictors use at most 1,024)
MAX_DENOISING_STEPS = 1_000  # steps of a scheduler's full schedule (DDPM trains with 1,000)
MAX_IMAGES_PER_PROMPT = 1_000
MAX_SCORE_LIMIT = 10_000_000  # questions / texts a scorer reads
MAX_COHORT = 1_024  # LoRAs trained in one pass over the base
# Examples in a built-in source, all splits pooled (known without loading the data): a group
# cannot hold more distinct images than the source has.
BUILTIN_SOURCE_EXAMPLES = {"shapes": 5_000}  # easy-vqa 1.0: 4,000 train + 1,000 test images


class ManifestError(DomainError):
    """A manifest that cannot be used; `problems` holds one line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        noun = "problem" if len(problems) == 1 else "problems"
        shown = [f"  {p}" for p in problems[:MAX_SHOWN_PROBLEMS]]
        if len(problems) > MAX_SHOWN_PROBLEMS:
            shown.append(f"  … and {len(problems) - MAX_SHOWN_PROBLEMS} more")
        super().__init__(f"{source}: {len(problems)} {noun}\n" + "\n".join(shown))


class StrictModel(BaseModel):
    """Base of every manifest section: unknown keys are errors, instances are frozen, floats finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------- hyperparameter values

Scalar = Union[StrictBool, int, float, str]


class Choice(StrictModel):
    choice: list[Scalar] = Field(min_length=1, description="Pick one of these, uniformly.")


class Uniform(StrictModel):
    uniform: tuple[float, float] = Field(description="[low, high], drawn uniformly.")

    @field_validator("uniform")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] <= value[1]:
            raise ValueError(f"low must be ≤ high, got {list(value)}")
        if not math.isfinite(value[1] - value[0]):  # a draw is low + u·(high − low)
            raise ValueError(f"the range {list(value)} is too wide to draw from (high − low overflows)")
        return value


class LogUniform(StrictModel):
    loguniform: tuple[float, float] = Field(description="[low, high], both > 0, log-uniform.")

    @field_validator("loguniform")
    @classmethod
    def _positive_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"needs 0 < low ≤ high, got {list(value)}")
        return value


class IntRange(StrictModel):
    int_range: tuple[int, int] = Field(description="[low, high], integers, both ends included.")

    @field_validator("int_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not value[0] <= value[1]:
            raise ValueError(f"low must be ≤ high, got {list(value)}")
        return value


DISTRIBUTIONS = {"choice": Choice, "uniform": Uniform, "loguniform": LogUniform, "int_range": IntRange}
_VALUE_HELP = (
    "expected a fixed value or one of {choice: [a, b, ...]}, {uniform: [low, high]}, "
    "{loguniform: [low, high]}, {int_range: [low, high]}"
)


def _value_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return next(k for k in DISTRIBUTIONS if isinstance(value, DISTRIBUTIONS[k]))
    if isinstance(value, dict):
        return next(iter(value)) if len(value) == 1 and next(iter(value)) in DISTRIBUTIONS else None
    if isinstance(value, (bool, int, float, str)):
        return "fixed"
    return None


HyperValue = Annotated[
    Union[
        Annotated[Scalar, Tag("fixed")],
        Annotated[Choice, Tag("choice")],
        Annotated[Uniform, Tag("uniform")],
        Annotated[LogUniform, Tag("loguniform")],
        Annotated[IntRange, Tag("int_range")],
    ],
    Discriminator(_value_tag, custom_error_type="hyperparameter_value", custom_error_message=_VALUE_HELP),
]


# ---------------------------------------------------------------- sections


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


class PopulationSection(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Lower-case slug naming the population in the store.")
    version: int = Field(1, ge=1, le=1_000_000, description="Bump when the population's meaning changes (1..1,000,000).")
    description: str = Field("", max_length=2000, description="One line for humans and the dataset card.")

    @field_validator("name")
    @classmethod
    def _no_parent_reference(cls, value: str) -> str:
        if ".." in value:  # the name is a folder under populations/, published/ and learn/
            raise ValueError(f"{value!r} contains '..'; use letters, digits and single '.', '_' or '-'")
        return value


class BaseSection(StrictModel):
    ref: str = Field(min_length=1, description="HF model id, local path, or built-in `tiny:NAME`.")
    revision: str | None = Field(None, description="Git revision of an HF id; pins the base.")
    kind: ModelKind = Field(description="What the base is: a diffusion pipeline or a causal LM.")
    size: Literal["full", "smoke"] = Field("full", description="Built-in `tiny:` bases only: `smoke` builds in seconds, for tests.")

    @model_validator(mode="after")
    def _tiny_name_matches_kind(self) -> BaseSection:
        if self.size != "full" and not self.ref.startswith("tiny:"):
            raise ValueError(f"size {self.size!r} applies to built-in tiny: bases only, not {self.ref!r}")
        if self.ref.startswith("tiny:"):
            name = self.ref.removeprefix("tiny:")
            known = [n for n, k in TINY_BASES.items() if k == self.kind]
            if name not in TINY_BASES:
                raise ValueError(f"unknown built-in base {self.ref!r}; known {self.kind} bases: {', '.join('tiny:' + n for n in known)}")
            if TINY_BASES[name] != self.kind:
                raise ValueError(f"{self.ref!r} is a {TINY_BASES[name]} model, not {self.kind}; use one of {', '.join('tiny:' + n for n in known)}")
        return self


class IdentityGroups(StrictModel):
    """Each LoRA trains on one group of images (CelebA: one identity)."""

    kind: Literal["identity_groups"]
    num_groups: int = Field(ge=1, le=MAX_COUNT, description=f"How many distinct groups jobs are drawn from (1..{MAX_COUNT:,}).")
    group_size: int = Field(20, ge=1, le=MAX_GROUP_SIZE, description=(
        f"Images per group (tiny world; CelebA uses the identity's images): 1..{MAX_GROUP_SIZE:,}, and at most the "
        "images the source holds (checked at validation for built-in sources, else when the job draws its data)."))


class ClassSubsets(StrictModel):
    """Each LoRA trains on images of a random non-empty subset of the classes."""

    kind: Literal["class_subsets"]
    classes: list[str] = Field(min_length=1, description="Class names jobs draw subsets of.")
    min_classes: int = Field(1, ge=1, description="Fewest classes a job draws (≤ the number of classes).")
    max_classes: int | None = Field(None, ge=1, description="Most classes a job draws (≤ the number of classes); default: all classes.")
    images_per_class: int = Field(10, ge=1, le=MAX_SUBSET_EXAMPLES, description=f"Images of each drawn class (1..{MAX_SUBSET_EXAMPLES:,}).")

    @model_validator(mode="after")
    def _bounds(self) -> ClassSubsets:
        top = self.max_classes or len(self.classes)
        if not self.min_classes <= top <= len(self.classes):
            raise ValueError(f"need min_classes ≤ max_classes ≤ {len(self.classes)} (the number of classes), got {self.min_classes}..{top}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct")
        return self


class SourceSubsets(StrictModel):
    """Each LoRA trains on the union of the sources left after leaving out a random subset."""

    kind: Literal["source_subsets"]
    sources: list[str] = Field(min_length=2, description="Source names (ARC: id prefixes such as MCAS, TIMSS).")
    examples_per_source: int | None = Field(None, ge=1, le=MAX_SUBSET_EXAMPLES, description=f"Cap per source (1..{MAX_SUBSET_EXAMPLES:,}); default: all.")

    @field_validator("sources")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("sources must be distinct")
        return value


SubsetSpec = Annotated[Union[IdentityGroups, ClassSubsets, SourceSubsets], Field(discriminator="kind")]


class DataColumns(StrictModel):
    """Which columns of an `hf:` / `folder:` dataset mean what. Unset entries take the dataset's
    known defaults (`pipeline.data.hub.KNOWN_DATASETS`), else are detected from its features."""

    id: str | None = Field(None, description="Unique example id; default `id` if present, else a hash of the row's content.")
    image: str | None = Field(None, description="Image column (an `Image` feature); default: the first one.")
    caption: str | None = Field(None, description="Caption column; default: the class name, else empty.")
    identity: str | None = Field(None, description="Identity column for identity_groups (CelebA: `celeb_id`).")
    label: str | None = Field(None, description="Class column for class_subsets (a ClassLabel or strings); default: the first ClassLabel.")
    label_names: dict[str, str] | None = Field(None, description="Class names as the dataset stores them → as the manifest writes them.")
    attributes: list[str] | None = Field(None, description="Per-image attribute columns; default: every bool column.")
    question: str | None = Field(None, description="QA: question column (default `question`).")
    choices: str | None = Field(None, description="QA: choices column, a list of strings or {text: [...], label: [...]} (default `choices`).")
    answer: str | None = Field(None, description="QA: answer column: a key in choices.label, a letter A.., a 1-based digit string, or a 0-based int (default `answerKey` or `answer`).")
    source: str | None = Field(None, description="QA: each question's source: `id_prefix` (id up to the first `_`), `config`, `column:NAME` or `=NAME` (constant).")
    min_identity_images: int = Field(1, ge=1, description="Identities with fewer images are not groups.")


def _omit_none(data: dict, keys: tuple[str, ...]) -> dict:
    """Leave unset optional dataset fields out of dumps, so adding them changes no existing hash."""
    return {k: v for k, v in data.items() if not (k in keys and v is None)}


class DataSection(StrictModel):
    source: str = Field(description="`shapes`, `qa`, `skills` (built in), `hf:<dataset id>` or `folder:<path>`.")
    revision: str | None = Field(None, description="Revision of an `hf:` dataset.")
    config: str | list[str] | None = Field(None, description="Config(s) of an `hf:` / `folder:` dataset (a list is pooled); default: the dataset's known default.")
    columns: DataColumns | None = Field(None, description="Column mapping of an `hf:` / `folder:` dataset.")
    split: str = Field("train", description="Split of the source that jobs draw from (`a+b` pools splits).")
    subsets: SubsetSpec

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict:
        return _omit_none(handler(self), ("config", "columns"))

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in BUILTIN_DATA_SOURCES or (value.startswith(("hf:", "folder:")) and len(value.split(":", 1)[1]) > 0):
            return value
        raise ValueError(f"unknown data source {value!r}; valid: {', '.join(BUILTIN_DATA_SOURCES)}, hf:<dataset id>, folder:<path>")


class LoraSection(StrictModel):
    rank: Annotated[list[Annotated[int, Field(ge=1, le=MAX_RANK)]], BeforeValidator(_as_list)] = Field(
        min_length=1, max_length=64, description=f"LoRA rank (1..{MAX_RANK:,}), or a list of up to 64 ranks each job draws one of."
    )
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    alpha_per_rank: float | None = Field(None, gt=0, description=(
        "Instead of alpha: each job's alpha is this × its rank, so the update's scale alpha / rank is the same at "
        "every rank (for populations where rank is to be the only shift)."))
    target_modules: list[str] = Field(min_length=1, description="Module names (suffixes) that get LoRA layers.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout unless hyperparameters.lora_dropout sets it.")

    @model_validator(mode="after")
    def _one_alpha(self) -> LoraSection:
        if (self.alpha is None) == (self.alpha_per_rank is None):
            raise ValueError("give exactly one of alpha (the same for every rank) and alpha_per_rank (alpha = it × rank); "
                             f"got alpha={self.alpha}, alpha_per_rank={self.alpha_per_rank}")
        return self

    def alpha_at(self, rank: int) -> float:
        """The alpha of a job of `rank`."""
        return float(self.alpha) if self.alpha is not None else float(self.alpha_per_rank) * rank


class Hyperparameters(StrictModel):
    """Each entry is a fixed value or a distribution; job k draws its own values."""

    learning_rate: HyperValue | None = None
    steps: HyperValue | None = Field(None, description=f"Optimiser steps per LoRA, 1..{MAX_STEPS:,}.")
    epochs: HyperValue | None = Field(None, description=f"Passes over the job's data (causal LM), 1..{MAX_EPOCHS:,}.")
    batch_size: HyperValue | None = Field(None, description=f"Examples per micro-batch, 1..{MAX_BATCH:,}.")
    gradient_accumulation: HyperValue | None = Field(None, description=f"Micro-batches per optimiser step, 1..{MAX_ACCUMULATION:,}.")
    weight_decay: HyperValue | None = None
    lora_dropout: HyperValue | None = None
    lora_init: HyperValue | None = Field(None, description=(
        "How the LoRA factors start: `gaussian` (A ~ N(0, 1/r), B = 0; the diffusion trainer's default) or `peft_default` "
        "(peft's Kaiming-uniform A, B = 0; the causal-LM trainer's default). Unset: the trainer's default."))
    instance_prompt: HyperValue | None = None
    resolution: HyperValue | None = Field(None, description=f"Training image side in pixels (diffusion), 1..{MAX_RESOLUTION:,}.")
    max_length: HyperValue | None = Field(None, description=f"Tokens per example (causal LM), 1..{MAX_LENGTH:,}.")
    mixed_precision: HyperValue | None = Field(None, description="no, fp16, bf16 or fp8 (an unquoted YAML `no` reads as false and means no).")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted `no` (`mixed_precision=no`, `mixed_precision: no`) as false: it means "no"."""
        if value is False:
            return "no"
        if isinstance(value, dict) and isinstance(value.get("choice"), list):
            return {**value, "choice": ["no" if v is False else v for v in value["choice"]]}
        return value

    @field_validator("*")
    @classmethod
    def _every_draw_fits(cls, value: Any, info: ValidationInfo) -> Any:
        """Every value the entry can draw has the hyperparameter's type and range."""
        if value is None:
            return value
        kind, check = HYPERPARAMETER_RULES[info.field_name]
        if isinstance(value, (Uniform, LogUniform)) and kind != "number":
            raise ValueError(f"draws real numbers, but {info.field_name} takes {HYPERPARAMETER_HELP[info.field_name]}; "
                             "use {choice: [...]} or {int_range: [low, high]}")
        if isinstance(value, Uniform | LogUniform | IntRange):
            candidates = list(next(iter(value.model_dump().values())))
        else:
            candidates = value.choice if isinstance(value, Choice) else [value]
        for candidate in candidates:
            if not check(candidate):
                raise ValueError(f"{_short_repr(candidate)} does not fit: {info.field_name} takes {HYPERPARAMETER_HELP[info.field_name]}")
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


def _count_up_to(most: int) -> Any:
    return lambda value: _is_count(value, most)


# The largest value each count hyperparameter may take (distributions: every value they can draw).
HYPERPARAMETER_MAXIMA = {"steps": MAX_STEPS, "epochs": MAX_EPOCHS, "batch_size": MAX_BATCH,
                         "gradient_accumulation": MAX_ACCUMULATION, "resolution": MAX_RESOLUTION, "max_length": MAX_LENGTH}


MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
LORA_INITS = ("gaussian", "peft_default")
# name -> (kind of value, check of one value). Distributions are checked on every value they can draw.
HYPERPARAMETER_RULES: dict[str, tuple[str, Any]] = {
    "learning_rate": ("number", lambda v: _is_number(v) and v > 0),
    **{name: ("count", _count_up_to(most)) for name, most in HYPERPARAMETER_MAXIMA.items()},
    "weight_decay": ("number", lambda v: _is_number(v) and v >= 0),
    "lora_dropout": ("number", lambda v: _is_number(v) and 0 <= v < 1),
    "lora_init": ("text", lambda v: v in LORA_INITS),
    "instance_prompt": ("text", lambda v: isinstance(v, str)),
    "mixed_precision": ("text", lambda v: v in MIXED_PRECISION),
}
HYPERPARAMETER_HELP = {
    "learning_rate": "numbers > 0", "weight_decay": "numbers ≥ 0", "lora_dropout": "numbers in [0, 1)",
    "instance_prompt": "strings", "mixed_precision": f"one of {', '.join(MIXED_PRECISION)}",
    "lora_init": f"one of {', '.join(LORA_INITS)}",
    **{name: f"whole numbers 1..{most:,}" for name, most in HYPERPARAMETER_MAXIMA.items()},
}


HYPERPARAMETERS_BY_KIND: dict[str, tuple[str, ...]] = {
    "diffusion": ("learning_rate", "steps", "batch_size", "gradient_accumulation", "weight_decay",
                  "lora_dropout", "lora_init", "instance_prompt", "resolution", "mixed_precision"),
    "causal_lm": ("learning_rate", "steps", "epochs", "batch_size", "gradient_accumulation",
                  "weight_decay", "lora_dropout", "lora_init", "max_length", "mixed_precision"),
}
REQUIRED_HYPERPARAMETERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "diffusion": (("learning_rate",), ("steps",)),
    "causal_lm": (("learning_rate",), ("epochs", "steps")),
}


class ClipScoreScorer(StrictModel):
    name: Literal["clip_score"]
    model: str = Field("tiny:shapes-clip", min_length=1, description=(
        "An open_clip model name (`ViT-B-16`), `hf-hub:<repo>` or `local-dir:<folder>` (open_clip's hub layout: "
        "open_clip_config.json + weights), or `tiny:shapes-clip`."))
    pretrained: str | None = Field(None, description=(
        "With an open_clip model name: a pretrained tag (`openai`; weights from the hub cache, `lol fetch` fills it) or a "
        "local `.safetensors` checkpoint file; unset: random weights. Not with `hf-hub:` / `local-dir:` (they carry their weights)."))
    size: Literal["full", "smoke"] = Field("full", description="For `tiny:` CLIP models: `smoke` builds in seconds (tests).")
    prompts: str | list[str] = Field(description="A prompt list, or a preset: `paper33`, `shapes-captions`.")
    seed: int = 0
    steps: int = Field(25, ge=1, le=MAX_DENOISING_STEPS, description=f"Denoising steps per image, 1..{MAX_DENOISING_STEPS:,}.")
    guidance_scale: float = Field(7.5, ge=0)
    images_per_prompt: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT, description=f"Images per prompt, 1..{MAX_IMAGES_PER_PROMPT:,}.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description=f"Images per generation batch, 1..{MAX_BATCH:,}.")
    resolution: int | None = Field(None, ge=8, le=4096, multiple_of=8, description=(
        "Side of the generated images in pixels, a multiple of 8 in 8..4,096; unset: the base's own (SD-1.x: 512)."))

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or any(not p.strip() for p in value)):
            raise ValueError("the prompt list must hold at least one non-empty prompt")
        return value

    @model_validator(mode="after")
    def _weights_named_once(self) -> ClipScoreScorer:
        if self.pretrained is not None and self.model.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"model {self.model!r} carries its weights; leave pretrained unset (got {self.pretrained!r})")
        return self


class AttributesScorer(StrictModel):
    name: Literal["attributes"]
    attributes: list[str] = Field(min_length=1, description="Per-example attributes to majority-vote.")


class MembershipScorer(StrictModel):
    name: Literal["membership"]


class McAccuracyScorer(StrictModel):
    name: Literal["mc_accuracy"]
    benchmark: str = Field(description="`skills:<set>[+<set>…]` or `skills:all`, `qa:<set>` (tiny world), `hf:<dataset id>` or `folder:<path>`.")
    split: str = "test"
    limit: int | None = Field(None, ge=1, le=MAX_SCORE_LIMIT, description=f"Score the first N questions only (1..{MAX_SCORE_LIMIT:,}).")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description=f"Questions per batch, 1..{MAX_BATCH:,}.")
    config: str | list[str] | None = Field(None, description="Config(s) of an `hf:` / `folder:` dataset; default: its known default.")
    revision: str | None = Field(None, description="Revision of an `hf:` dataset.")
    columns: DataColumns | None = Field(None, description="Column mapping of an `hf:` / `folder:` QA dataset.")

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict:
        return _omit_none(handler(self), ("config", "revision", "columns"))


class EvalLossScorer(StrictModel):
    name: Literal["eval_loss"]
    dataset: str = Field(description="Held-out text set, named as for mc_accuracy.")
    split: str = "validation"
    limit: int | None = Field(None, ge=1, le=MAX_SCORE_LIMIT, description=f"Score the first N texts only (1..{MAX_SCORE_LIMIT:,}).")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description=f"Texts per batch, 1..{MAX_BATCH:,}.")
    config: str | list[str] | None = Field(None, description="Config(s) of an `hf:` / `folder:` dataset; default: its known default.")
    revision: str | None = Field(None, description="Revision of an `hf:` dataset.")
    columns: DataColumns | None = Field(None, description="Column mapping of an `hf:` / `folder:` QA dataset.")

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict:
        return _omit_none(handler(self), ("config", "revision", "columns"))


class SourcesScorer(StrictModel):
    name: Literal["sources"]


ScorerSpec = Annotated[
    Union[ClipScoreScorer, AttributesScorer, MembershipScorer, McAccuracyScorer, EvalLossScorer, SourcesScorer],
    Field(discriminator="name"),
]
SCORERS_BY_KIND = {
    "diffusion": ("clip_score", "attributes", "membership"),
    "causal_lm": ("mc_accuracy", "eval_loss", "sources"),
}


class PublishSection(StrictModel):
    repo_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$",
                                description="Hub dataset repo `namespace/name`; unset publishes locally only.")
    splits: dict[Literal["train", "validation", "test"], float] = Field(
        default_factory=lambda: dict(PROTOCOL_FRACTIONS),
        description="Fraction of groups per split; fractions sum to 1. The default is the LoL protocol's "
                    "(train 0.7, validation 0.15, test 0.15): published splits then equal the ones `lol train` uses.",
    )
    split_seed: int | None = Field(
        None, description="Unset: a group's split is a hash of its name alone (the protocol's rule; populations "
                          "sharing groups split them alike). An integer draws splits from (seed, group) instead.")
    license: str = "cc-by-4.0"
    private: bool = False

    @field_validator("repo_id")
    @classmethod
    def _no_parent_reference(cls, value: str | None) -> str | None:
        if value is not None and ".." in value:
            raise ValueError(f"{value!r} contains '..'; a hub repo id is namespace/name")
        return value

    @field_validator("splits")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        if "train" not in value:
            raise ValueError("a train split is required")
        if any(f < 0 for f in value.values()) or not math.isclose(sum(value.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must be ≥ 0 and sum to 1, got {dict(value)}")
        return value


class LearnSection(StrictModel):
    predictors: list[Literal[PREDICTORS]] = Field(  # type: ignore[valid-type]  (the names of lol_models/names.py)
        default_factory=lambda: list(PREDICTORS), min_length=1
    )
    targets: list[str] = Field(default_factory=list, description="Label names; default: every label.")
    seeds: int = Field(5, ge=1, le=MAX_LEARN_SEEDS, description=f"Final trainings per predictor and target with the chosen config "
                                                              f"(test metrics are their mean, with bootstrap CIs), 1..{MAX_LEARN_SEEDS}.")
    tuning_budget: int = Field(8, ge=1, le=MAX_LEARN_SEEDS, description="Configs every predictor tries, drawn from its own search "
                                                                   f"space (the first: its defaults); chosen on validation only. 1..{MAX_LEARN_SEEDS}.")
    selection_seeds: int = Field(2, ge=1, le=MAX_LEARN_SEEDS, description=f"Trainings per tried config; its validation score is their mean. 1..{MAX_LEARN_SEEDS}.")
    min_epochs: int = Field(10, ge=1, le=MAX_LEARN_EPOCHS, description=f"The earliest epoch the epoch rule may pick (capped at `epochs`), 1..{MAX_LEARN_EPOCHS:,}.")
    smooth_epochs: int = Field(5, ge=1, le=MAX_LEARN_EPOCHS, description="The epoch rule ranks epochs by the mean validation score "
                                                                      f"of this many epochs ending there, 1..{MAX_LEARN_EPOCHS:,}.")
    split: Literal["protocol", "published"] = Field("protocol", description="protocol: every row's split from its group's name "
                                                    "alone (no leaks between populations sharing groups); published: as published.")
    epochs: int = Field(50, ge=1, le=MAX_LEARN_EPOCHS, description=f"Predictor training epochs, 1..{MAX_LEARN_EPOCHS:,}.")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description=f"LoRAs per predictor batch, 1..{MAX_BATCH:,}.")
    learning_rate: float = Field(1e-3, gt=0)
    hidden: int = Field(64, ge=1, le=MAX_HIDDEN, description=f"Predictor width, 1..{MAX_HIDDEN:,}.")
    search: dict[Literal[PREDICTORS], dict[str, Annotated[list[Any], Field(min_length=1)]]] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Widen a predictor's search space: predictor → {config field or training setting: "
                                          "[choices]}, e.g. {glnet: {scale_free: [false, true]}}. The tuning budget stays "
                                          "the same for every predictor; fields and values are checked when learning starts.")


class ExecutionSection(StrictModel):
    """How jobs run; never part of a job's identity (a LoRA is the same whatever trained it)."""

    cohort_size: Literal["auto"] | Annotated[int, Field(ge=1, le=MAX_COHORT)] = Field(
        "auto", description=f"LoRAs trained (and scored) in the same passes over the base: a number (1..{MAX_COHORT:,}), or auto "
                            "(max_cohort_size, reduced to what free memory holds). 1: one at a time.")
    max_cohort_size: int = Field(16, ge=1, le=MAX_COHORT, description=f"The largest cohort `auto` forms, 1..{MAX_COHORT:,}.")
    memory_fraction: float = Field(0.5, gt=0, le=1, description="Share of the free memory a cohort may fill.")
    only_splits: list[Literal["train", "validation", "test"]] | None = Field(
        None, min_length=1, description="Plan only the jobs whose finetuning group falls in these published splits "
                                        "(publish.splits, publish.split_seed; with the defaults these are the LoL protocol's splits that "
                                        "`lol train` and `lol experiment transfer` use), e.g. [test] for a population that only "
                                        "tests predictors trained on another. Job ids and indices do not change (--limit N takes "
                                        "the first N planned jobs): a later run without it adds the other jobs.")

    @property
    def requested_cohort_size(self) -> int:
        return self.max_cohort_size if self.cohort_size == "auto" else int(self.cohort_size)


class Manifest(StrictModel):
    population: PopulationSection
    base: BaseSection
    data: DataSection
    lora: LoraSection
    hyperparameters: Hyperparameters
    count: int = Field(ge=1, le=MAX_COUNT, description=f"How many LoRAs the population holds, 1..{MAX_COUNT:,}.")
    seed: int = Field(0, ge=0, description="Root seed; job k depends only on (job content, seed, k).")
    scorers: list[ScorerSpec] = Field(default_factory=list)
    publish: PublishSection = Field(default_factory=PublishSection)
    learn: LearnSection = Field(default_factory=LearnSection)
    execution: ExecutionSection = Field(default_factory=ExecutionSection)

    @model_validator(mode="after")
    def _consistent_with_kind(self, info: ValidationInfo) -> Manifest:
        problems = self.cross_section_problems()
        collected = (info.context or {}).get("cross_section_problems")
        if collected is not None:  # from_text reports them with their own YAML paths
            collected.extend(problems)
        elif problems:
            raise ValueError("; ".join(f"{_path_text(loc)}: {message}" for loc, message in problems))
        return self

    def cross_section_problems(self) -> list[tuple[Loc, str]]:
        """Checks that span sections: hyperparameters and scorers must fit the base's kind."""
        kind = self.base.kind
        problems: list[tuple[Loc, str]] = []
        given = [k for k, v in self.hyperparameters if v is not None]
        allowed = HYPERPARAMETERS_BY_KIND[kind]
        for name in given:
            if name not in allowed:
                problems.append((("hyperparameters", name), f"does not apply to {kind} bases (valid: {', '.join(allowed)})"))
        for options in REQUIRED_HYPERPARAMETERS[kind]:
            if not any(o in given for o in options):
                problems.append((("hyperparameters",), f"needs {' or '.join(options)} for {kind} bases"))
        for i, scorer in enumerate(self.scorers):
            if scorer.name not in SCORERS_BY_KIND[kind]:
                problems.append((("scorers", i, "name"), f"scorer {scorer.name!r} does not apply to {kind} bases (valid: {', '.join(SCORERS_BY_KIND[kind])})"))
        subsets, known = self.data.subsets, BUILTIN_SOURCE_EXAMPLES.get(self.data.source)
        if isinstance(subsets, IdentityGroups) and known is not None and subsets.group_size > known:
            problems.append((("data", "subsets", "group_size"),
                             f"{subsets.group_size:,} images per group, but source {self.data.source!r} holds {known:,} images "
                             "in all; a group cannot hold more distinct images than its source"))
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            problems.append((("scorers",), f"each scorer may appear once, got {names}"))
        for i, split in enumerate(self.execution.only_splits or []):
            if not self.publish.splits.get(split):
                shares = {name: share for name, share in self.publish.splits.items() if share}
                problems.append((("execution", "only_splits", i), f"split {split!r} holds no group: publish.splits gives it "
                                 f"no share (splits with a share: {', '.join(shares)})"))
        return problems

    # ------------------------------------------------------------ loading

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Manifest:
        """Load and validate a manifest file, applying `key=value` overrides."""
        path = Path(path)
        if not path.is_file():
            siblings = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
            hint = f"; YAML files in {path.parent}/: {', '.join(siblings)}" if siblings else ""
            raise ManifestError(str(path), [f"no such manifest file{hint}"])
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ManifestError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(str(path), [f"the file is larger than {MAX_MANIFEST_BYTES} bytes; a manifest is a page of YAML"])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(str(path), [f"not UTF-8 text: byte {exc.start} cannot be decoded ({exc.reason})"]) from None
        return cls.from_text(text, source=str(path), overrides=overrides)

    @classmethod
    def from_text(cls, text: str, source: str = "<manifest>", overrides: list[str] | None = None) -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestError(source, [f"the text is longer than {MAX_MANIFEST_BYTES} characters; a manifest is a page of YAML"])
        try:
            data, yaml_source = load_yaml(text)
        except YamlDuplicateKeyError as exc:  # every duplicate, each with its path and both lines
            raise ManifestError(source, [f"{_path_text(loc)} (line {line}): duplicate key, first written on line {first}; "
                                         "YAML would keep only the last — write it once" for loc, line, first in exc.duplicates]) from None
        except YamlSyntaxError as exc:
            raise ManifestError(source, [f"not valid YAML: {exc}"]) from None
        if not isinstance(data, dict):
            raise ManifestError(source, [f"the top level must be a mapping of sections ({', '.join(cls.model_fields)}), got {type(data).__name__}"])
        problems: list[str] = []
        for override in overrides or []:
            try:
                apply_override(data, override)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ManifestError(source, problems)
        cross: list[tuple[Loc, str]] = []
        try:
            manifest = cls.model_validate(data, context={"cross_section_problems": cross})
        except ValidationError as exc:
            raise ManifestError(source, format_errors(exc, yaml_source)) from None
        if cross:
            raise ManifestError(source, [f"{_path_text(loc)} (line {yaml_source.line_of(loc)}): {msg}" for loc, msg in cross])
        return manifest

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def text_as_run(self, text: str, overrides: list[str] | None, source: str = "the manifest") -> str:
        """What the store and the published dataset keep as the population's `manifest.yaml`: the file's
        own text when it ran as written; with overrides, this manifest as YAML (it parses back to the same
        manifest, so the card's canonical hash is the copy's), headed by the file and the overrides."""
        if not overrides:
            return text
        import yaml

        header = [f"# {source}, run with these overrides (applied in order; comments of the file left out):"]
        header += [f"#   {override}" for override in overrides]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- overrides


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in nested `data`; the value is parsed as YAML (`count=10` is an int)."""
    shown = override if len(override) <= 80 else override[:60] + "…" + override[-10:]
    if "=" not in override:
        raise ValueError(f"override {shown!r} must look like key.path=value (e.g. count=10, lora.rank=8)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {shown!r}: empty key segment in {key!r}")
    try:
        value, _ = load_yaml(raw)
    except YamlSyntaxError as exc:
        raise ValueError(f"override {shown!r}: the value is not usable YAML ({exc})") from None
    node = data
    for part in parts[:-1]:
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {shown!r}: {part!r} holds a {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- error formatting


def format_errors(exc: ValidationError, source: YamlSource) -> list[str]:
    """One line per pydantic error: display path, YAML line, message, suggestion."""
    lines: list[tuple[int, str]] = []
    for error in exc.errors(include_url=False):
        loc, model = _display_loc(error["loc"])
        path = _path_text(loc)
        line = source.line_of(loc)
        where = f"{path} (line {line})" if line else path
        kind = error["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1]) if loc else ""
            valid = list(model.model_fields) if model else []
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            lines.append((line or 0, f"{where}: unknown key; {hint}"))
            continue
        message = error["msg"].removeprefix("Value error, ")
        if kind == "missing":
            message = "required key is missing"
        elif kind not in ("value_error",) and "input" in error and not isinstance(error["input"], (dict, list)):
            message = f"{message} (got {_short_repr(error['input'])})"
        lines.append((line or 0, f"{where or '<top level>'}: {message}"))
    return [text for _, text in sorted(lines, key=lambda item: item[0])]


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 12]}…{text[-8:]} ({len(text)} characters)"


def _path_text(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _display_loc(loc: tuple) -> tuple[Loc, type[BaseModel] | None]:
    """Drop the union tags pydantic adds to locations, and find the model owning the last key.

    Walks the schema from `Manifest` alongside the location. Returns the location as the user
    wrote it and the model class whose fields are the siblings of the last element.
    """
    shown: list[str | int] = []
    annotation: Any = Manifest
    owner: type[BaseModel] | None = None
    for part in loc:
        options = _unwrap(annotation)
        models = [o for o in options if isinstance(o, type) and issubclass(o, BaseModel)]
        if isinstance(part, str) and part not in {f for m in models for f in m.model_fields}:
            tagged = _tag_target(models, part)
            if tagged is not None:  # a union tag, not a key the user wrote
                annotation = tagged
                continue
        shown.append(part)
        if isinstance(part, int):
            annotation = next((typing.get_args(o)[0] for o in options if typing.get_origin(o) in (list, tuple) and typing.get_args(o)), Any)
            continue
        owner = next((m for m in models if part in m.model_fields), models[0] if models else None)
        if owner is not None and part in owner.model_fields:
            annotation = owner.model_fields[part].annotation
        else:
            dicts = [o for o in options if typing.get_origin(o) is dict]
            annotation = typing.get_args(dicts[0])[1] if dicts else Any
    return tuple(shown), owner


def _unwrap(annotation: Any) -> list[Any]:
    """Flatten Annotated / Optional / Union into the list of concrete options."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or isinstance(annotation, types.UnionType):
        return [o for a in typing.get_args(annotation) for o in _unwrap(a)]
    return [annotation]


def _tag_target(models: list[type[BaseModel]], tag: str) -> Any:
    """The union member a pydantic tag names: a scorer's `name`, a subset's `kind`, a distribution."""
    if tag in DISTRIBUTIONS:
        return DISTRIBUTIONS[tag]
    if tag == "fixed":
        return Any
    for model in _all_tagged_models():
        for field in ("name", "kind"):
            info = model.model_fields.get(field)
            if info is not None and typing.get_origin(info.annotation) is Literal and tag in typing.get_args(info.annotation):
                return model
    return None


def _all_tagged_models() -> list[type[BaseModel]]:
    return [ClipScoreScorer, AttributesScorer, MembershipScorer, McAccuracyScorer, EvalLossScorer,
            SourcesScorer, IdentityGroups, ClassSubsets, SourceSubsets]
