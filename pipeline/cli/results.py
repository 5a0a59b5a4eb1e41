"""`lol predict | export`: use what a population run produced — a trained predictor on new LoRAs,
a published row back as a peft adapter folder."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pipeline.cli.common import StoreOpt, load, out
from storage import Store

app = typer.Typer()


def _finite(value):
    """`value` with every NaN/Inf float as None, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _seconds(value: float) -> str:
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"


@app.command("predict")
def predict_command(
    predictor: Annotated[str, typer.Argument(help="A predictor trained by `lol train` (mlp, mlp_svd, …, glnet), or the "
                                                  "path of a saved one (learn/{population}/predictors/*.json).", show_default=False)],
    adapters: Annotated[list[str], typer.Argument(help="peft adapter folders (adapter_config.json + adapter_model.safetensors) "
                                                       "of the population's base, or job ids of its stored LoRAs.", show_default=False)],
    store: StoreOpt = None,
    population: Annotated[Optional[str], typer.Option("--population", "-p", help="Population whose predictors to use "
                                                      "(default: the only one the store has trained).")] = None,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", "-m", help="Or the population of this manifest.")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only these tasks or label columns (repeatable; "
                                                      "default: every task the predictor was trained on).")] = None,
    seed: Annotated[int, typer.Option(help="Which trained run: the seed of `lol train`'s repeats.")] = 0,
    repeats: Annotated[int, typer.Option(min=1, help="Timed predictions per LoRA (the median is shown).")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    trust_remote_pickle: Annotated[bool, typer.Option("--trust-remote-pickle", help="Also read pickle adapters (adapter_model.bin); unpickling can run code.")] = False,
) -> int:
    """Predict the labels of LoRAs with a trained predictor, beside how long computing them took."""
    from pipeline.predict import predict

    if manifest is not None:
        named = load(manifest, []).population.name
        if population and population != named:
            raise typer.BadParameter(f"{manifest} is population {named!r}, --population says {population!r}; give one",
                                     param_hint="--manifest")
        population = named
    report = predict(Store(store, create=False), population, predictor, adapters, tasks=task, seed=seed,
                     repeats=repeats, trust_remote_pickle=trust_remote_pickle)
    if as_json:
        sys.stdout.write(json.dumps(_finite(report.as_json()), indent=1) + "\n")  # plain JSON: NaN/Inf as null
        return 0
    out.print(_predict_table(report))
    timed = [row for row in report.rows if any(t is not None for t in row.label_times.values())]
    if timed:  # only LoRAs with a recorded (or typical) label time: nothing is estimated
        predicted = sum(row.predict_seconds for row in timed) / len(timed)
        computed = sum(t.seconds for row in timed for t in row.label_times.values() if t is not None) / len(timed)
        out.print(f"per LoRA: predicting {_seconds(predicted)}, computing the labels {_seconds(computed)} "
                  f"({len(timed)} of {len(report.rows)} LoRAs with a time on record): computing took "
                  f"{computed / predicted:,.3g}× as long as predicting")
    for scorer in report.scorers:
        sources = Counter(f"{_SOURCE_MARK.get(t.source.split(' (')[0], '≈')} {t.source}".strip() if t else "not recorded"
                          for t in (row.label_times[scorer] for row in report.rows))
        out.print(f"{scorer} took: " + "; ".join(f"{source} ({n} LoRA{'s' if n > 1 else ''})" for source, n in sources.items()))
    for note in report.notes:
        out.print(f"note: {note}")
    return 0


# how the "took" cells mark where a time comes from (the lines under the table spell it out)
_SOURCE_MARK = {"score record": "", "lol experiment speed": "†"}


def _took(time) -> str:
    if time is None:
        return "not recorded"
    return f"{_SOURCE_MARK.get(time.source.split(' (')[0], '≈')}{_seconds(time.seconds)}"


def _predict_table(report) -> Table:
    columns = [c for t in report.tasks for c in t["columns"]]
    labels = [c.split(".", 1)[-1] for c in columns]
    headers = labels if len(set(labels)) == len(labels) else columns  # scorer prefixes only where needed
    table = Table(title=f"{report.predictor} (seed {report.seed}) on {len(report.rows)} LoRA(s) of {report.population}: "
                        + "; ".join(f"{t['task']} ({'P(1) → label' if t['kind'] == 'multilabel' else 'value'})" for t in report.tasks))
    table.add_column("LoRA", overflow="fold")
    table.add_column("rank", justify="right")
    for header in headers:
        table.add_column(header, justify="right", overflow="fold")
    table.add_column("predicted in", justify="right")
    for scorer in report.scorers:
        table.add_column(f"{scorer} took", justify="right")
    for row in report.rows:
        cells = []
        for column in columns:
            value = row.values[column]
            cell = f"{value:.2f} → {int(value >= 0.5)}" if report.kinds[column] == "multilabel" else f"{value:.4g}"
            if column in row.scored:
                cell += f" (scored {row.scored[column]:.4g})"
            cells.append(cell)
        times = [_took(t) for t in row.label_times.values()]
        label = row.adapter if row.job_id is None or row.job_id == row.adapter else f"{row.adapter} ({row.job_id})"
        table.add_row(label, str(row.rank), *cells, _seconds(row.predict_seconds), *times)
    return table


@app.command("export")
def export_command(
    dataset: Annotated[Path, typer.Argument(help="A published dataset folder (`lol publish` writes {store}/published/{population}).",
                                            show_default=False)],
    job_id: Annotated[str, typer.Argument(help="The LoRA's job id (the dataset's job_id column).", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="A new or empty folder for the adapter.", show_default=False)],
    diffusers: Annotated[Optional[bool], typer.Option("--diffusers/--no-diffusers", help="Also write pytorch_lora_weights.safetensors "
                                                      "for diffusers' load_lora_weights (default: for LoRAs of a diffusers model).")] = None,
) -> int:
    """Write one published LoRA back as a peft adapter folder (PeftModel.from_pretrained loads it)."""
    from pipeline.export import export_row

    result = export_row(dataset, job_id, out_dir, diffusers=diffusers)
    out.print(f"exported {result.job_id} ({result.population}, {result.split} split, rank {result.rank}, alpha "
              f"{result.alpha:g}) to {result.out}: {', '.join(result.files)}")
    base = result.base_ref + (f" @ {result.base_revision}" if result.base_revision else "")
    out.print(f"load it with PeftModel.from_pretrained(<{base}>, {str(result.out)!r})"
              + (f"; with diffusers: pipe.load_lora_weights({str(result.out)!r})" if result.diffusers else ""))
    return 0
