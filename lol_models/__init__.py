"""Learning on LoRAs: featurizers, models, training and metrics (pure PyTorch; never imports pipeline).

Exports are resolved lazily so `import lol_models.weights` stays light (no sklearn/scipy).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # weights.py
    "GroupLayout": "weights", "LayerGroup": "weights", "Layout": "weights", "LoraWeights": "weights",
    "collate": "weights",
    # symmetry.py
    "gl_act": "symmetry", "random_gl": "symmetry", "random_gl_like": "symmetry",
    "random_orthogonal": "symmetry", "random_orthogonal_like": "symmetry",
    # registry.py and model configs
    "MODELS": "registry", "available_models": "registry", "build_model": "registry",
    "register_model": "registry",
    "MLPConfig": "models", "SVDConfig": "models", "OAlignConfig": "models", "DenseConfig": "models",
    "TransformerConfig": "models", "GLNetConfig": "glnet", "GLNet": "glnet", "LoLModel": "common",
    "GLNetPaper": "glnet_paper", "GLNetPaperConfig": "glnet_paper", "SearchSpace": "search",
    "SettingsError": "common",
    # train.py and metrics.py
    "LabeledLoras": "train", "RunResult": "train", "SeedSummary": "train", "TrainConfig": "train",
    "evaluate": "train", "fit": "train", "predict": "train", "run_seeds": "train", "train_and_evaluate": "train",
    "regression_metrics": "metrics", "multilabel_metrics": "metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lol_models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lol_models' has no attribute {name!r}")
