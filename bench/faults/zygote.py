"""What every fault worker needs, imported once by their fork server (`bench.faults.worker`).

Importing this module loads torch, diffusers, transformers, peft and accelerate (including the
classes diffusers and transformers import lazily when a pipeline is loaded), the trainers and
the scorers, and measures the tiny world's shapes table (cached per process), so that each
worker forked afterwards starts warm instead of spending seconds on imports.
"""

import logging

import accelerate  # noqa: F401
import peft  # noqa: F401
from diffusers import (  # noqa: F401
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

import pipeline.finetune.diffusion  # noqa: F401
import pipeline.score.data_labels  # noqa: F401
import pipeline.score.runner  # noqa: F401
from pipeline.data import get_source

tqdm.get_lock()  # made here once, not in each worker (a killed worker could not release its semaphore)
try:
    get_source("shapes").examples("train")
except Exception as exc:  # a fork server must come up whatever the data; workers then measure it themselves
    logging.getLogger(__name__).warning("could not preload the shapes table: %s", exc)
