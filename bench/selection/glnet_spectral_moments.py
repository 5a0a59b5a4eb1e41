"""Model selection for GL-net's spectral-moment readout (`spectral_moments`: P = 0, 2, 4) on every
task of each published folder given, next to MLP+SVD and MLP+O-Align (see compare.py).

Usage: python bench/selection/glnet_spectral_moments.py STORE/published/tiny-shapes STORE/published/tiny-arc
"""

import sys

import torch
from compare import compare

MODELS = [("glnet", {"spectral_moments": 0}), ("glnet", {"spectral_moments": 2}), ("glnet", {"spectral_moments": 4}),
          ("mlp_svd", None), ("mlp_oalign", None)]

if __name__ == "__main__":
    torch.set_num_threads(1)
    compare(sys.argv[1:], MODELS)
