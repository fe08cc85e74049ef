"""The toy world: procedural captioned images, a toy stride-8 VAE and a "toy GenEval" judge, CPU-sized."""
from .scenes import (BACKGROUNDS, CATEGORY_CHECKS, COLORS, POSITIONS, SHAPES, SIZES, Prompt, Scene,
                     ToyWorldConfig, ToyWorldDataset, caption, evaluator_world, generate, parse_caption,
                     prompt_set, render, sample_scene, scene_labels, single_object_world, to_tensor, to_uint8)
