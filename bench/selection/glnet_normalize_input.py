"""Model selection for GL-net's input normalisation on every task of each published folder given:
GL-net with and without `normalize_input`, next to the MLP and MLP+O-Align (see compare.py).

Usage: python bench/selection/glnet_normalize_input.py STORE/published/tiny-shapes STORE/published/tiny-arc
"""

import sys

import torch
from compare import compare

MODELS = [("glnet", {"normalize_input": True}), ("glnet", {"normalize_input": False}), ("mlp", None), ("mlp_oalign", None)]

if __name__ == "__main__":
    torch.set_num_threads(1)
    compare(sys.argv[1:], MODELS)
