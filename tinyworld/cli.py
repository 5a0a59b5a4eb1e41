"""`lol bases build | evaluate | list`: the tiny world's bases (a plugin of the `lol` CLI,
registered under the `lol.commands` entry points)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pipeline.cli.common import StoreOpt, err, out, progress_bar
from storage import Store

bases_app = typer.Typer(help="Build and list the built-in tiny bases (tiny:shapes-sd, tiny:shapes-clip, tiny:qa-lm).",
                        no_args_is_help=True)


@bases_app.command("build")
def bases_build(
    names: Annotated[Optional[list[str]], typer.Argument(help="Bases to build (default: all).", show_default=False)] = None,
    size: Annotated[str, typer.Option(help="full, or smoke (seconds; for tests).")] = "full",
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache holds it.")] = False,
    ship: Annotated[bool, typer.Option(help="Also copy each build into pipeline/bases/shipped/ (maintainers: what the repository ships).")] = False,
    store: StoreOpt = None,
) -> int:
    """Pretrain each base once and cache it under {store}/bases/, keyed by its recipe hash."""
    from pipeline.bases import tiny_modules
    from pipeline.bases.cache import ensure_base, shipped_bytes, shipped_names
    from pipeline.bases.cache import ship as ship_base

    target = Store(store)
    table = Table(title=f"tiny bases in {target.url}")
    for column in ("base", "recipe", "from", "metrics"):
        table.add_column(column)
    for name in names or list(tiny_modules()):
        with progress_bar() as progress:
            task = progress.add_task(f"tiny:{name.removeprefix('tiny:')}", total=None)
            built = ensure_base(name, target, size=size, force=force,
                                progress=lambda done, total, task=task: progress.update(task, completed=done, total=total),
                                log=lambda message: err.print(message, highlight=False))
        metrics = " ".join(f"{k}={v}" for k, v in sorted(built.metrics.items()) if not isinstance(v, (dict, list)))
        table.add_row(f"tiny:{built.name}", built.recipe.folder, built.source, metrics)
        if ship and built.name in shipped_names():
            err.print(f"shipped: {ship_base(built)}", highlight=False)
        elif ship:
            err.print(f"tiny:{built.name} is not shipped (SHIPPED = False in its module): built only", highlight=False)
    out.print(table)
    if ship:
        sizes = shipped_bytes()
        out.print(f"shipped weights: {sum(sizes.values()) / 1e6:.1f} MB in all ({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sizes.items())})")
    return 0


@bases_app.command("evaluate")
def bases_evaluate(
    size: Annotated[str, typer.Option(help="full, or smoke (seconds; for tests).")] = "full",
    samples: Annotated[int, typer.Option(help="Images per caption for prompt following.")] = 8,
    effect_images: Annotated[int, typer.Option(help="Neutral-prompt images per LoRA for the colour effect.")] = 48,
    colours: Annotated[Optional[list[str]], typer.Option("--colour", help="Colours for the LoRA effect (default: all 8).")] = None,
    grid: Annotated[Optional[Path], typer.Option(help="Also save one generated image per caption as a PNG grid.")] = None,
    effect_grid: Annotated[Optional[Path], typer.Option(help="Also save neutral-prompt images without and with each colour's LoRA as a PNG.")] = None,
    output: Annotated[Path, typer.Option(help="Where to write the figures (JSON).")] = Path("bench/results/tiny-world-quality.json"),
    store: StoreOpt = None,
) -> int:
    """Measure tiny:shapes-sd: prompted colour/shape by tiny:shapes-clip and by pixels, and a LoRA's colour effect."""
    import json as json_module

    from pipeline.bases.cache import ensure_base
    from pipeline.data.shapes import COLORS
    from tinyworld import shapes_clip, shapes_sd
    from tinyworld.shapes_quality import evaluate_base

    unknown = sorted(set(colours or []) - set(COLORS))
    if unknown:
        raise typer.BadParameter(f"unknown colour(s) {unknown}; valid: {', '.join(COLORS)}", param_hint="--colour")
    target = Store(store)
    log = lambda message: err.print(message, highlight=False)  # noqa: E731
    sd = ensure_base("shapes-sd", target, size=size, log=log)
    clip = ensure_base("shapes-clip", target, size=size, log=log)
    pipe = shapes_sd.load(sd.path)
    with progress_bar() as progress:
        progress.add_task("generating and finetuning", total=None)
        result = evaluate_base(pipe, shapes_clip.load(clip.path), samples, effect_images, colours or COLORS,
                               effect_grid=effect_grid)
    result["bases"] = {"shapes-sd": sd.recipe.folder, "shapes-clip": clip.recipe.folder}
    table = Table(title=f"tiny:shapes-sd ({sd.recipe.folder})")
    for column in ("judge", "prompted colour", "prompted shape", "both", "LoRA colour ratio (min over colours)"):
        table.add_column(column)
    for judge in ("clip", "pixels"):
        pf = result["prompt_following"][judge]
        table.add_row(judge, f"{pf['color_accuracy']:.1%}", f"{pf['shape_accuracy']:.1%}", f"{pf['both_accuracy']:.1%}",
                      f"{result['lora_effect']['min_ratio'][judge]:.2f}×")
    out.print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json_module.dumps(result, indent=1))
    out.print(f"results: {output}")
    if grid is not None:
        shapes_sd.save_sample_grid(pipe, grid)
        out.print(f"samples: {grid}")
    if effect_grid is not None:
        out.print(f"LoRA effect samples: {effect_grid}")
    return 0


@bases_app.command("evaluate-lm")
def bases_evaluate_lm(
    size: Annotated[str, typer.Option(help="full, or smoke (seconds; for tests).")] = "full",
    split: Annotated[str, typer.Option(help="The skills split to answer: test (563 questions) or validation.")] = "test",
    output: Annotated[Path, typer.Option(help="Where to write the figures (JSON).")] = Path("bench/results/tiny-qa-lm-quality.json"),
    store: StoreOpt = None,
) -> int:
    """Measure tiny:qa-lm: zero-shot accuracy on the skills' held-out questions, per skill, with 95% intervals."""
    import json as json_module

    from pipeline.bases.cache import ensure_base
    from pipeline.data.skills import SkillsSource
    from tinyworld import qa_lm

    if split not in SkillsSource().splits() or split in ("pretrain", "train"):
        raise typer.BadParameter(f"{split!r} is not a held-out skills split; valid: validation, test", param_hint="--split")
    base = ensure_base("qa-lm", Store(store), size=size, log=lambda message: err.print(message, highlight=False))
    model, tokenizer = qa_lm.load(base.path)
    with progress_bar() as progress:
        progress.add_task("answering", total=None)
        result = qa_lm.skills_quality(model, tokenizer, split)
    result["base"] = base.recipe.folder
    table = Table(title=f"tiny:qa-lm ({base.recipe.folder}), {split} split, chance 0.25")
    for column in ("skill", "questions", "acc", "95% interval"):
        table.add_column(column)
    for name, r in [*result["per_skill"].items(), ("all", result["acc"])]:
        table.add_row(name, str(r["questions"]), f"{r['value']:.3f}", f"{r['ci_low']:.3f} – {r['ci_high']:.3f}")
    out.print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json_module.dumps(result, indent=1))
    out.print(f"results: {output}")
    return 0


@bases_app.command("list")
def bases_list(store: StoreOpt = None) -> int:
    """The built bases the store holds."""
    target = Store(store, create=False)
    entries = target.list_dir("bases")
    for entry in entries:
        out.print(entry)
    if not entries:
        out.print(f"no built bases in {target.url}; `lol bases build` makes them")
    return 0
