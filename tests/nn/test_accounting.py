"""Models report their own parameter groups and FLOPs (tdlm.nn.accounting).

For every preset (models built on the meta device): the groups partition the parameters
exactly (every parameter in one group), ``count_parameters`` equals the former name-matching
count, and ``model_forward_flops`` equals the analytic formula with the former name-matching
head/embedding shapes; parameters no nn/ module claims (DID's rate layer) are ``other``."""
from __future__ import annotations

import pytest
import torch

from tdlm.config import get_preset, preset_names
from tdlm.families.base import meta_family
from tdlm.flops import forward_flops, model_forward_flops
from tdlm.nn.accounting import parameter_groups, reporting_modules, seq_stats
from tdlm.nn.dit import DiT, FinalLayer, count_parameters
from tdlm.nn.heads import FinalLayer as HeadsFinalLayer


def old_count_parameters(model):
    """The name-matching count of tdlm.nn.dit before the protocol (frozen here)."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "vocab_embed" in n)
    head = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith("head.") and ".linear" in n)
    blocks = sum(p.numel() for n, p in model.named_parameters()
                 if ".blocks." in n or n.startswith("blocks."))
    return {"total": total, "embedding": emb, "head": head, "blocks": blocks,
            "other": total - emb - head - blocks, "head_share": head / total}


def old_head_and_embed(model):
    """The name-matching shapes of tdlm.flops.model_head_and_embed (frozen here)."""
    head_out = getattr(model, "head_out", None) or sum(
        m.out_features for name, m in model.head.named_modules()
        if isinstance(m, torch.nn.Linear) and "adaLN" not in name)
    return head_out, model.backbone.vocab_embed.num_embeddings


@pytest.mark.parametrize("preset", preset_names())
def test_groups_partition_and_counts_equal_the_former_ones(preset):
    cfg = get_preset(preset)
    _, model = meta_family(cfg)
    groups = parameter_groups(model)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))                                   # at most one group
    assert set(ids) == {id(p) for p in model.parameters()}             # every parameter
    assert count_parameters(model) == old_count_parameters(model)
    lengths = [cfg.data.seq_len] * 3 + [7]
    head_out, n_embed = old_head_and_embed(model)
    assert model_forward_flops(model, lengths) == forward_flops(cfg.model, lengths, head_out,
                                                                n_embed)


def test_unclaimed_parameters_are_other():
    cfg = next(get_preset(n) for n in preset_names() if get_preset(n).model.family == "did")
    _, model = meta_family(cfg)
    assert [type(m) for m in reporting_modules(model)] == [DiT, FinalLayer]
    other = {id(p) for p in parameter_groups(model)["other"]}
    assert all(id(p) in other for p in model.rate.parameters())       # DID's rate layer
    assert all(id(p) in other for p in model.backbone.sigma_map.parameters())
    assert {id(p) for p in parameter_groups(model)["head"]} == \
        {id(p) for p in model.head.linear.parameters()}


def test_bare_backbone_and_bad_reports():
    cfg = get_preset("tiny").model
    net = DiT(cfg, 11)
    c = count_parameters(net)
    assert c["head"] == 0 and c["embedding"] == 11 * cfg.d_model
    assert c["blocks"] == sum(p.numel() for p in net.blocks.parameters())

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def param_groups(self):
            return {"head": [self.lin.weight], "other": [self.lin.weight]}

    with pytest.raises(ValueError, match="twice"):
        parameter_groups(Twice())
    with pytest.raises(ValueError, match="tdlm.nn modules"):
        model_forward_flops(torch.nn.Linear(2, 2), [3])


def test_seq_stats_and_heads_module():
    assert seq_stats([3, 4])[:3] == (2, 7, 25) and seq_stats([3, 4]).conditioning == 2
    assert seq_stats(torch.tensor([[1, 2], [3, 0]]))[:3] == (4, 6, 14)
    assert seq_stats([3, 4]).shared_conditioning().conditioning == 1
    assert seq_stats([]).shared_conditioning().conditioning == 0
    with pytest.raises(ValueError):
        seq_stats([-1])
    assert FinalLayer is HeadsFinalLayer          # tdlm.nn.dit re-exports the head
