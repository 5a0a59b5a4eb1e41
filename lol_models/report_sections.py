"""The report's experiment sections: what `lol experiment ranks|transfer|speed` and `lol bench scaling`
left in the store's learn area (every population's) and in the benchmark results, beside the main table.

Each section is a markdown table of the main metric (mean ± std over seeds) per task × predictor
and test set, with its figure copied into the report's `figures/` so the report reads on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lol_models import rank_generalisation, transfer
from lol_models.shift import metric_cells

__all__ = ["experiment_sections"]

SPEED_FILE = "speed.json"  # pipeline.speed.RESULTS_FILE (pipeline imports lol_models, not the reverse)


def experiment_sections(learn_root: Path, figures: Path, scaling_figure: Path | None = None) -> list[str]:
    """Markdown lines for every experiment found under `learn_root` (the store's `learn/`), figures copied to `figures`."""
    lines: list[str] = []
    for path in sorted(learn_root.glob(f"*/ranks/**/{rank_generalisation.RESULTS_FILE}")):  # one folder per rank setting
        data = json.loads(path.read_text())
        parts = path.parent.relative_to(learn_root).parts  # (population, "ranks", *setting folder)
        population, setting = parts[0], parts[2:]
        selection = f", configs chosen on held-out rank {data['select_on_rank']}" if data.get("select_on_rank") is not None else ""
        title = (f"Rank generalisation ({population}): train on ranks {data.get('train_ranks')}, "
                 f"test on unseen ranks {data.get('test_ranks')}{selection}")
        lines += _shift_section(title, data["tasks"], {"seen": "seen ranks", "unseen": "unseen ranks"},
                                path.parent / rank_generalisation.FIGURE_FILE, figures,
                                "-".join(["ranks", population, *setting]))
    for path in sorted(learn_root.glob(f"*/transfer-from-*/{transfer.RESULTS_FILE}")):
        data = json.loads(path.read_text())
        source, target = path.parent.name.removeprefix("transfer-from-"), path.parent.parent.name
        lines += _shift_section(f"Transfer: trained on {source}, tested on {source} and on {target}", data["tasks"],
                                {"a_test": f"{source} test", "b_test": f"{target} test"},
                                path.parent / transfer.FIGURE_FILE, figures, f"transfer-{source}-{target}")
    for path in sorted(learn_root.glob(f"*/speed/{SPEED_FILE}")):
        data = json.loads(path.read_text())
        lines += [f"## Speed ({path.parent.parent.name}): predicting {data['label']} instead of computing it", "",
                  f"{data['predictor']} predicts it in {data['predict_seconds_per_lora'] * 1e6:.0f} µs per LoRA; computing it "
                  f"({data['images_per_lora']} images per LoRA) takes {data['score_seconds_per_lora']:.2f} s: "
                  f"**{data['speedup']:,.0f}×**.", ""]
    if scaling_figure is not None and scaling_figure.is_file():
        shutil.copyfile(scaling_figure, figures / "scaling.png")
        lines += ["## Scaling to GPT-3-shaped LoRAs", "",
                  f"Forward time and peak memory per model, rank-4 LoRAs shaped like GPT-3 125M … 175B (`{scaling_figure.name}`).",
                  "", "![scaling](figures/scaling.png)", ""]
    return lines


def _shift_section(title: str, tasks: dict[str, Any], tests: dict[str, str], figure: Path, figures: Path,
                   stem: str) -> list[str]:
    header = ["task", "metric", "predictor", *tests.values()]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, entry in tasks.items():
        for predictor in entry["predictors"]:
            cells = metric_cells(tasks, task, predictor, list(tests))
            rows.append(f"| {task} | {entry['metric']} | {predictor} | " + " | ".join(cells) + " |")
    lines = [f"## {title}", "", *rows, ""]
    if figure.is_file():
        shutil.copyfile(figure, figures / f"{stem}.png")
        lines += [f"![{title}](figures/{stem}.png)", ""]
    return lines
