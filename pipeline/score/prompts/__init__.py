"""Prompt-list presets for the `clip_score` scorer.

- `paper33`: the 33 prompts the LoL paper's CelebA-LoRA CLIP scores were computed on
  (mostly DrawBench / PartiPrompts; listed in `paper33.txt`, one per line).
- `shapes-captions`: the 24 captions of the tiny world ("a red circle", …).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.score import ScorerError

PRESETS = ("paper33", "shapes-captions")


def resolve_prompts(prompts: str | list[str]) -> list[str]:
    """A preset name or an explicit list → the list of prompts."""
    if isinstance(prompts, list):
        return prompts
    if prompts == "paper33":
        return [line for line in (Path(__file__).with_name("paper33.txt")).read_text(encoding="utf-8").splitlines() if line.strip()]
    if prompts == "shapes-captions":
        from pipeline.data.shapes import COLORS, SHAPES

        return [f"a {color} {shape}" for color in COLORS for shape in SHAPES]
    raise ScorerError(f"unknown prompt preset {prompts!r}; presets: {', '.join(PRESETS)}, or give a list of prompts")
