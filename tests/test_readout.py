"""Readout probes (l2p.toyworld.readout): the MLP probe reads what is there and nothing else; the token under
each object is the right one; the table has a column per representation."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from l2p.toyworld import readout
from l2p.toyworld import scenes as sc


def test_mlp_readout_reads_a_label_that_is_in_the_features_and_not_one_that_is_not():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    signal = torch.cat([torch.nn.functional.one_hot(labels, 4).float(), torch.randn(600, 28, generator=g)], 1)
    noise = torch.randn(600, 32, generator=g)
    assert readout.mlp_readout(signal + 0.3 * torch.randn(600, 32, generator=g), labels, 400, epochs=20) > 0.8
    assert readout.mlp_readout(noise, labels, 400, epochs=20) < 0.45  # chance is 0.25
    with pytest.raises(ValueError, match="n_train"):
        readout.mlp_readout(noise, labels, 600)


@pytest.mark.parametrize("grid", [4, 8])
def test_the_patch_under_each_objects_centre_token_holds_that_object(grid):
    """Row/column order and cell size: the object's colour is in the patch the probe reads, on both token grids."""
    cfg = replace(sc.single_object_world(), backgrounds=("plain",))
    images, _, scenes = sc.generate(40, 3, cfg)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    rows, cols = readout._cells(scenes, grid)
    patches = readout._patches(x, rows, cols, grid).reshape(len(x), 3, -1)
    for p, s in zip(patches, scenes):
        rgb = torch.tensor(s.objects[0].rgb).float().reshape(3, 1) * 255
        assert ((p - rgb).abs().max(0).values < 30).any(), s.objects[0]


def test_shape_readout_table_on_the_smoke_world():
    from l2p.toyworld.recipe import FINETUNE_MODES, initial_model
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    model = initial_model(world, FINETUNE_MODES["smoke"])
    df = readout.shape_readout(world, {"pixel init": model}, sigmas=(0.3, 1.0), n_train=48, n_test=16)
    assert list(df.index) == [0.3, 1.0]
    assert list(df.columns) == ["input: pixels", "input: latents", "tokens: source LDM", "tokens: pixel init"]
    assert np.isin(df.to_numpy() * 16, np.arange(17)).all()  # accuracies over 16 held-out scenes
