"""The built-in predictor names, defined once: the registry registers them, the manifest schema
accepts them and the CLI offers them. A light module (no torch) so schemas and CLIs import it freely."""

from __future__ import annotations

from enum import Enum

PREDICTORS: tuple[str, ...] = ("mlp", "mlp_svd", "mlp_oalign", "mlp_dense", "transformer", "glnet", "glnet_paper")

Predictor = Enum("Predictor", {name: name for name in PREDICTORS}, type=str)  # choices of a CLI option
