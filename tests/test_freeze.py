"""Freeze policies on the real L2P 1K key layout (from the reference TSV, no weights) and on small modules."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from l2p.freeze import (apply_policy, format_table, param_group, paper_frozen_layers, parameter_table,
                        trainable_names)

TSV = Path("/work/shared/reference/l2p_1k_transformer.tsv")


@pytest.fixture(scope="module")
def l2p_1k_shapes():
    if not TSV.is_file():
        pytest.skip(f"{TSV} not available")
    shapes = {}
    for line in TSV.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.split("x"))
    assert len(shapes) == 545
    return shapes


def count(shapes, names):
    return sum(math.prod(shapes[n]) for n in names)


def test_paper_policy_on_l2p_1k(l2p_1k_shapes):
    chosen = trainable_names(l2p_1k_shapes, "paper", n_layers=30, n=5)
    frozen = set(l2p_1k_shapes) - chosen
    assert len(chosen) == 245 and len(frozen) == 300
    assert count(l2p_1k_shapes, chosen) == 2_548_257_795
    assert count(l2p_1k_shapes, frozen) == 3_618_206_720
    assert {param_group(n)[1] for n in frozen} == set(range(5, 25))
    # The code trains more than the paper's summary names: refiners, t/cap embedders and pad tokens too.
    assert {"x_pad_token", "cap_pad_token", "t_embedder.mlp.0.weight", "cap_embedder.1.weight",
            "noise_refiner.0.attention.to_q.weight", "context_refiner.1.feed_forward.w2.weight"} <= chosen

    table = parameter_table(l2p_1k_shapes, chosen)
    rows = table.set_index("group")
    assert list(table.group) == ["pad_tokens", "x_embedder", "t_embedder", "cap_embedder", "noise_refiner",
                                 "context_refiner", "layers 0-4", "layers 5-24", "layers 25-29", "local_decoder",
                                 "total"]
    assert rows.loc["layers 5-24", "status"] == "frozen" and rows.loc["layers 0-4", "status"] == "trainable"
    assert rows.loc["layers 5-24", "params"] == 3_618_206_720
    assert rows.loc["local_decoder", "params"] == 10_085_123 and rows.loc["local_decoder", "tensors"] == 28
    assert rows.loc["total", "trainable_params"] == 2_548_257_795
    assert rows.loc["total", "frozen_params"] == 3_618_206_720
    assert rows.loc["total", "tensors"] == 545 and rows.loc["total", "trainable_tensors"] == 245
    assert "2,548,257,795" in format_table(table)


def test_other_policies_on_l2p_1k(l2p_1k_shapes):
    names = list(l2p_1k_shapes)
    assert trainable_names(names, "full") == set(names)
    head = trainable_names(names, "head-only")
    assert len(head) == 28 and count(l2p_1k_shapes, head) == 10_085_123
    eh = trainable_names(names, "embedder+head")
    assert count(l2p_1k_shapes, eh) == 10_085_123 + 2_952_960
    # n is configurable: n=2 freezes layers 2..27
    n2 = trainable_names(names, "paper", n=2)
    assert {param_group(x)[1] for x in set(names) - n2} == set(range(2, 28))


def test_custom_patterns(l2p_1k_shapes):
    names = list(l2p_1k_shapes)
    only0 = trainable_names(names, "custom", include=["layers.0.*"])
    assert len(only0) == 15 and all(n.startswith("layers.0.") for n in only0)
    # modifiers on top of a policy: paper, but keep the pad tokens frozen and train layer 12's attention
    mod = trainable_names(names, "paper", include=["layers.12.attention.*"], exclude=["*_pad_token"])
    base = trainable_names(names, "paper")
    assert mod == (base | {n for n in names if n.startswith("layers.12.attention.")}) - {"x_pad_token",
                                                                                         "cap_pad_token"}
    table = parameter_table(l2p_1k_shapes, mod).set_index("group")
    assert table.loc["layers 12-12", "status"] == "partial" and table.loc["pad_tokens", "status"] == "frozen"
    with pytest.raises(ValueError, match=r"include pattern 'layer.0.\*' matches no parameter"):
        trainable_names(names, "custom", include=["layer.0.*"])
    with pytest.raises(ValueError, match="unknown freeze policy 'half'"):
        trainable_names(names, "half")


def test_paper_frozen_range():
    assert list(paper_frozen_layers(30, 5)) == list(range(5, 25))
    assert list(paper_frozen_layers(8, 5)) == []  # 2n ≥ N: the release's slice is empty
    assert list(paper_frozen_layers(12, 3)) == list(range(3, 9))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Linear(4, 4)


class _Latent(nn.Module):
    """A latent-model-shaped module: final layer, no local_decoder."""

    def __init__(self, n_layers=6):
        super().__init__()
        self.x_pad_token = nn.Parameter(torch.zeros(1, 4))
        self.all_x_embedder = nn.ModuleDict({"2-1": nn.Linear(8, 4)})
        self.t_embedder = nn.Linear(2, 4)
        self.layers = nn.ModuleList(_Block() for _ in range(n_layers))
        self.all_final_layer = nn.ModuleDict({"2-1": nn.Linear(4, 8)})


def test_apply_policy_sets_requires_grad():
    m = _Latent(6)
    summary = apply_policy(m, "paper", n=2)  # freezes layers 2, 3
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {f"layers.{i}.attention.{w}" for i in (2, 3) for w in ("weight", "bias")}
    assert summary.frozen_params == 2 * 20 and summary.trainable_tensors == len(list(m.parameters())) - 4
    assert "layers 2-3" in str(summary)
    head = apply_policy(m, "head-only")  # latent model: the final layer is the head
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"all_final_layer.2-1.weight",
                                                                        "all_final_layer.2-1.bias"}
    assert head.table.set_index("group").loc["final_layer", "status"] == "trainable"
    # wrapper prefixes (DDP's module.) do not hide the release names
    names = [f"module.{n}" for n, _ in m.named_parameters()]
    assert {param_group(n)[1] for n in set(names) - trainable_names(names, "paper", n=2)} == {2, 3}


def test_real_model_on_meta_device(l2p_1k_shapes):
    model_mod = pytest.importorskip("l2p.model", reason="l2p.model not written yet")
    from l2p.config import l2p_1k

    with torch.device("meta"):
        m = model_mod.ZImageDiT(l2p_1k())
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == l2p_1k_shapes
    summary = apply_policy(m, "paper")
    assert summary.trainable_params == 2_548_257_795 and summary.frozen_params == 3_618_206_720
    assert summary.trainable_tensors == 245
    assert sum(p.requires_grad for p in m.parameters()) == 245
