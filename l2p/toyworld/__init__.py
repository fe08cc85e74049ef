"""The toy world: procedural captioned images, a toy stride-8 VAE and a "toy GenEval" judge, CPU-sized.

Submodules: `scenes` (data, captions, prompts), `vae` (toy AutoencoderKL), `evaluator` (the judge), `ldm` (the
source model), `world` (all of it, cached; `SPECS["fine"]` is the 8-px-patch world), `corpus` (`l2p synth`),
`recipe` (convert + fine-tune), `ablations` (notebook 04) and `grid` (notebook 07, coarse vs fine token grid).
Heavier pieces (diffusers, the judge) load on first use of their submodule.
"""
from .scenes import (BACKGROUNDS, CATEGORY_CHECKS, COLORS, DEFAULT_CATEGORIES, POSITIONS, SHAPES, SIZES, Prompt,
                     Scene, ToyWorldConfig, ToyWorldDataset, caption, evaluator_world, generate, parse_caption,
                     prompt_set, render, sample_scene, scene_labels, single_object_world, to_tensor, to_uint8)
