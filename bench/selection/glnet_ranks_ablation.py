"""Rank generalisation of GL-net without its spectral moments (diagnostic for docs/results.md):
trains on ranks 2, 4, 8 of tiny-shapes-ranks and tests on the unseen 16, as `lol experiment ranks`.

Usage: python bench/selection/glnet_ranks_ablation.py STORE/published/tiny-shapes-ranks OUT_DIR
"""

import sys

import torch

from lol_models.rank_generalisation import rank_generalisation
from lol_models.shift import metric_of
from lol_models.tasks import LearnSettings

if __name__ == "__main__":
    torch.set_num_threads(1)
    result = rank_generalisation(sys.argv[1], LearnSettings(predictors=("glnet",)), sys.argv[2],
                                 model_configs={"glnet": {"spectral_moments": 0}})
    for task in result.tasks:
        cells = [f"{test} {mean:.3f} ± {std:.3f}" for test in ("seen", "unseen")
                 for mean, std in [metric_of(result.tasks, task, "glnet", test)]]
        print(f"glnet spectral_moments=0 {task}: " + ", ".join(cells), flush=True)
