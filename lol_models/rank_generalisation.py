"""Rank generalisation: train on LoRAs of some ranks, test on LoRAs of ranks never seen in training.

From a published population with several ranks (`lora.rank: [2, 4, 8, 16]`):

    train       = train split rows whose rank is in `train_ranks`
    validation  = validation split rows whose rank is in `train_ranks`   (picks the epoch)
    seen        = test split rows whose rank is in `train_ranks`         (reference)
    unseen      = test split rows whose rank is in `test_ranks`

With `select_on_rank` = s (one of the training ranks), configs are chosen the way the test measures:
trained on the train split's rows of the other training ranks, scored on the validation split's rank-s
rows, so the config that extrapolates to a rank it did not see wins (the same budget for every
predictor, validation rows only); the final runs then train on every training rank as above.

Unseen-rank rows come from the **test split only**. Taking every row of the unseen ranks would
bring back finetuning groups the predictor was trained on (the attribute labels are functions
of the group), mixing rank generalisation with memorising groups; the test split is
group-disjoint from train and validation, and `seen` vs `unseen` then compare the same groups.

Every LoRA arrives zero-padded to the dataset's largest rank (U Vᵀ is unchanged), so a model on
raw factors meets the unseen rank's extra columns as inputs it only ever saw as zeros, while a
rank-agnostic GL-invariant model (glnet, mlp_svd) sees the same kind of input as in training.

Outputs in `out_dir`:
    rank_generalisation.json    settings, ranks, row counts, per task × predictor: mean ± std over
                                seeds of every test metric on `seen` and `unseen`, and per seed
    rank_generalisation.png     test metric per predictor, seen vs unseen ranks, one panel per task

Shape legend: N LoRAs, r rank (padded to the dataset's largest).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lol_models.data import PulledDataError, read_rows, split_names
from lol_models.shift import labeled, metric_of, shift_bars, shift_experiment
from lol_models.tasks import LearnSettings, jsonable, load_splits, tasks_of

__all__ = ["RankGeneralisation", "published_ranks", "rank_generalisation", "rank_sets", "setting_name", "split_ranks"]

RESULTS_FILE = "rank_generalisation.json"
FIGURE_FILE = "rank_generalisation.png"


@dataclass
class RankGeneralisation:
    """What `rank_generalisation` measured; `tasks` as in rank_generalisation.json."""

    published: str
    ranks: list[int]  # every rank in the dataset
    train_ranks: list[int]
    test_ranks: list[int]
    rows: dict[str, int]  # train, validation, seen, unseen (+ selection_train, selection_validation)
    tasks: dict[str, Any] = field(default_factory=dict)
    results_path: Path | None = None
    figure_path: Path | None = None

    def metric(self, task: str, predictor: str, test: str = "unseen", metric: str | None = None) -> tuple[float, float]:
        """(mean, std) over seeds of `metric` (default: the task's main metric) on `test`."""
        return metric_of(self.tasks, task, predictor, test, metric)


def split_ranks(ranks: Iterable[int], train_ranks: Iterable[int] | None = None,
                test_ranks: Iterable[int] | None = None) -> tuple[list[int], list[int]]:
    """Check the requested rank sets against the dataset's ranks; default: train on all but the largest.

    Raises PulledDataError naming the dataset's ranks when fewer than 2, or when a set is empty,
    names a rank the dataset lacks, or overlaps the other.
    """
    present = sorted({int(r) for r in ranks})
    if len(present) < 2:
        only = f"only rank {present[0]}" if present else "no rows"
        raise PulledDataError(f"rank generalisation needs ≥ 2 ranks; this dataset has {only} "
                              "(publish a population with `lora.rank: [2, 4, 8, 16]`)")
    test = sorted({int(r) for r in test_ranks}) if test_ranks is not None else [present[-1]]
    train = sorted({int(r) for r in train_ranks}) if train_ranks is not None else [r for r in present if r not in test]
    for name, chosen in (("train_ranks", train), ("test_ranks", test)):
        if not chosen:
            raise PulledDataError(f"{name} is empty; this dataset has ranks {present}")
        unknown = [r for r in chosen if r not in present]
        if unknown:
            raise PulledDataError(f"{name} {unknown} not in this dataset; it has ranks {present}")
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise PulledDataError(f"train_ranks {train} and test_ranks {test} share {overlap}; they must be disjoint")
    return train, test


def published_ranks(published: str | Path) -> list[int]:
    """Every LoRA's rank in a local published folder, read from its `rank` column alone (no weights)."""
    return [int(row["rank"]) for split in split_names(published) for row in read_rows(published, split, columns=["rank"])]


def setting_name(train_ranks: Iterable[int], test_ranks: Iterable[int], select_on_rank: int | None = None) -> str:
    """The folder name of one rank setting, e.g. train-2-8_test-32_select-8 (ranks as `split_ranks` resolves them)."""
    def joined(ranks: Iterable[int]) -> str:
        return "-".join(str(r) for r in sorted(set(ranks)))

    return f"train-{joined(train_ranks)}_test-{joined(test_ranks)}" + (f"_select-{select_on_rank}" if select_on_rank is not None else "")


def _rows(ranks: torch.Tensor, wanted: list[int]) -> torch.Tensor:
    """Index Tensor of the rows whose rank is in `wanted`."""
    return torch.nonzero(torch.isin(ranks.long(), torch.tensor(wanted, dtype=torch.long))).flatten()


def rank_generalisation(published: str | Path, settings: LearnSettings, out_dir: str | Path,
                        train_ranks: Iterable[int] | None = None, test_ranks: Iterable[int] | None = None,
                        model_configs: Mapping[str, Any] | None = None,
                        on_run: Callable[[str, str], None] | None = None, split: str = "protocol",
                        select_on_rank: int | None = None, workers: int = 1) -> RankGeneralisation:
    """Train every predictor × task on `train_ranks`, test on the unseen `test_ranks` (and the seen ones).

    published: a published folder (or hub id) with train, validation and test splits and ≥ 2 ranks.
    train_ranks / test_ranks default to all ranks but the largest / the largest ({2, 4, 8} / {16}
    for `manifests/tiny-shapes-ranks.yaml`). model_configs: predictor → config (default: each
    model's defaults). split: "protocol" (default; groups re-split by name, `lol_models.splits`) or
    "published". select_on_rank: a training rank held out while configs are chosen (see above); None:
    chosen on the training ranks' validation rows. workers: predictor × task units trained at once, in
    processes (`shift_experiment`). Writes rank_generalisation.json and .png in `out_dir`.
    """
    splits = load_splits(published, split)
    present = torch.cat([s.ranks for s in splits.values()]).tolist()
    train, test = split_ranks(present, train_ranks, test_ranks)
    if select_on_rank is not None and (select_on_rank not in train or len(train) < 2):
        raise PulledDataError(f"select_on_rank {select_on_rank} must be one of ≥ 2 training ranks {train}, "
                              "so configs train on the others and are scored on it")
    index = rank_sets(splits, train, test, select_on_rank)
    rows = {name: len(idx) for name, (_, idx) in index.items()}
    lacking = {name: n for name, n in rows.items() if n < 2}
    if lacking:
        raise PulledDataError(
            f"too few rows for rank generalisation with train ranks {train} and test ranks {test}: {lacking} "
            f"(rows per split and rank: {_counts(splits)}); publish more LoRAs or a larger test split")
    tasks = tasks_of(splits["train"], settings.targets)
    counts = _counts(splits)
    sets = _sets(tasks, index)  # with workers, each builds its own (`load_sets`); these give the test targets
    load_sets = functools.partial(_load_sets, published, split, settings.targets, train, test, select_on_rank)
    results = shift_experiment(tasks, sets, settings, model_configs=model_configs, on_run=on_run, workers=workers,
                               load_sets=load_sets)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outcome = RankGeneralisation(str(published), sorted(set(present)), train, test, rows, results)
    record = {"experiment": "rank_generalisation", "published": str(published), "ranks": outcome.ranks,
              "train_ranks": train, "test_ranks": test, "rows": rows,
              "unseen_rows_from": "test split (group-disjoint from train and validation)",
              "select_on_rank": select_on_rank,
              "rows_per_split_and_rank": counts, "settings": settings.as_json(), "tasks": results}
    outcome.results_path = out / RESULTS_FILE
    outcome.results_path.write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
    outcome.figure_path = shift_bars(results, ["seen", "unseen"], [f"seen ranks {train}", f"unseen ranks {test}"],
                                     out / FIGURE_FILE, "Rank generalisation: test metric (mean ± std over seeds)")
    return outcome


def rank_sets(splits, train: list[int], test: list[int], select_on_rank: int | None) -> dict[str, tuple[Any, torch.Tensor]]:
    """Set name → (split dataset, index Tensor (n,) of its rows): train / validation (the training ranks),
    seen / unseen (the test split at the training / test ranks), and with `select_on_rank` the
    selection sets (train without that rank, validation at it)."""
    index = {
        "train": (splits["train"], _rows(splits["train"].ranks, train)),
        "validation": (splits["validation"], _rows(splits["validation"].ranks, train)),
        "seen": (splits["test"], _rows(splits["test"].ranks, train)),
        "unseen": (splits["test"], _rows(splits["test"].ranks, test)),
    }
    if select_on_rank is not None:
        index["selection_train"] = (splits["train"], _rows(splits["train"].ranks, [r for r in train if r != select_on_rank]))
        index["selection_validation"] = (splits["validation"], _rows(splits["validation"].ranks, [select_on_rank]))
    return index


def _sets(tasks, index) -> dict[str, dict[str, Any]]:
    return {task.name: {name: labeled(dataset, task, idx) for name, (dataset, idx) in index.items()} for task in tasks}


def _load_sets(published: str | Path, split: str, targets: tuple[str, ...], train: list[int], test: list[int],
               select_on_rank: int | None) -> dict[str, dict[str, Any]]:
    """The experiment's sets, built in a worker process from the published folder."""
    splits = load_splits(published, split)
    return _sets(tasks_of(splits["train"], targets), rank_sets(splits, train, test, select_on_rank))


def _counts(splits) -> dict[str, dict[int, int]]:
    return {name: {int(r): int(n) for r, n in zip(*torch.unique(s.ranks, return_counts=True))}
            for name, s in splits.items()}
