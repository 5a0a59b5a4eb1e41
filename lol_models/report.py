"""The report of a population's learn area: the main table and its figures, then every
experiment found beside it (rank generalisation, transfer, speed) and the scaling figure.

The top layer of `lol_models` (see `lol_models.tasks`).
"""

from __future__ import annotations

from pathlib import Path

from lol_models.experiments import evaluate, results_markdown
from lol_models.report_sections import experiment_sections
from lol_models.tasks import MAIN_METRIC, predictor_order


def report(out_dir: str | Path, title: str = "Learning on LoRAs", scaling_figure: Path | None = None) -> Path:
    """report.md with the main table and figures (predicted vs true per regression task, bars per
    task), then every experiment found in the store's learn area (`out_dir`'s parent: rank
    generalisation, transfer, speed) and the scaling figure, when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    if not any((out / "runs").glob("*.json")) and _has_experiments(out):  # e.g. only `lol experiment ranks` ran
        figures = out / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        lines = [f"# {title}", "", "## Main table", "", "Not trained yet: `lol train MANIFEST` trains it.", ""]
        return _write(out, lines + experiment_sections(out.parent, figures, scaling_figure))
    results = evaluate(out)  # no runs and no experiments: a clear error
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    lines = [f"# {title}", "", "## Main table", "", results_markdown(results), ""]
    for name, task in sorted(results.tasks.items()):
        ok = {p: r for p, r in task["predictors"].items() if "error" not in r}
        if not ok:
            continue
        metric = MAIN_METRIC[task["kind"]]
        names = sorted(ok, key=predictor_order)
        fig, ax = plt.subplots(figsize=(6, 3))
        means = [ok[p]["mean"].get(metric) or 0.0 for p in names]
        cis = [ok[p].get("ci", {}).get(metric, {}) for p in names]
        errors = [[max(m - (c.get("low") if c.get("low") is not None else m), 0.0) for m, c in zip(means, cis)],
                  [max((c.get("high") if c.get("high") is not None else m) - m, 0.0) for m, c in zip(means, cis)]]
        ax.bar(names, means, yerr=errors, color=["#d62728" if p == "glnet" else "#7f7f7f" for p in names], capsize=3)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{name}: {metric} (mean over seeds, bootstrap 95% CI)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        bars = figures / f"{_file(name)}-{metric}.png"
        fig.savefig(bars, dpi=110)
        plt.close(fig)
        lines += [f"## {name} ({task['kind']})", "", f"![{name} {metric}](figures/{bars.name})", ""]
        if task["kind"] == "regression":
            fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
            for ax, predictor in zip(axes[0], names):
                truth = [row[0] for row in ok[predictor]["test_targets"]]
                guess = [row[0] for row in ok[predictor]["test_predictions"]]
                ax.scatter(truth, guess, s=8, alpha=0.7)
                low, high = min(truth + guess), max(truth + guess)
                ax.plot([low, high], [low, high], color="black", linewidth=0.8)
                ax.set_title(predictor, fontsize=9)
                ax.set_xlabel("true", fontsize=8)
            axes[0][0].set_ylabel("predicted", fontsize=8)
            fig.suptitle(f"{name}: predicted vs true on the test split (seed 0)", fontsize=10)
            fig.tight_layout()
            scatter = figures / f"{_file(name)}-scatter.png"
            fig.savefig(scatter, dpi=110)
            plt.close(fig)
            lines += [f"![{name} scatter](figures/{scatter.name})", ""]
    return _write(out, lines + experiment_sections(out.parent, figures, scaling_figure))


def _has_experiments(out: Path) -> bool:
    """Whether the population's learn folder holds a rank, transfer or speed experiment's results."""
    return any(next(out.glob(pattern), None) is not None
               for pattern in ("ranks/**/*.json", "transfer-from-*/*.json", "speed/*.json"))


def _write(out: Path, lines: list[str]) -> Path:
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _file(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
