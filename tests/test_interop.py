"""Round trips through the reference implementation's checkpoint layout."""

import pytest
import torch

from switch_dit.interop import load_official, official_state_dict
from tests.test_models import batch, randomize, tiny


@pytest.mark.parametrize("family", ["DiT", "DTR", "Switch-DiT"])
def test_round_trip(family):
    src = randomize(tiny(f"{family}-S/2")).eval()
    sd = official_state_dict(src)
    if family == "Switch-DiT":
        assert "prior._unit_mapping" in sd and "full_time" in sd
        assert sd["routers.1.experts.w"].shape == (3, 24, 24)  # (M, D_in, D_out)
        assert "routers.0.f_gate.1.weight" in sd
    if family == "DTR":
        assert sd["routers.0._unit_mapping"].shape == (50, 24)
    for key in (
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "y_embedder.embedding_table.weight",
        "pos_embed",
        "blocks.0.attn.qkv.weight",
        "blocks.1.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
    ):
        assert key in sd
    dst = load_official(tiny(f"{family}-S/2").eval(), sd)
    x, t, y = batch(src)
    assert torch.equal(dst(x, t, y), src(x, t, y))


def test_training_checkpoint_with_prefixes_and_ema():
    src = randomize(tiny("Switch-DiT-S/2"), seed=1)
    ema = randomize(tiny("Switch-DiT-S/2"), seed=2)
    ckpt = {
        "model": {"module._orig_mod." + k: v for k, v in official_state_dict(src).items()},
        "ema": official_state_dict(ema),
        "opt": {},
    }
    a = load_official(tiny("Switch-DiT-S/2"), ckpt)
    b = load_official(tiny("Switch-DiT-S/2"), ckpt, ema=True)
    assert torch.equal(a.routers[0].experts.w, src.routers[0].experts.w)
    assert torch.equal(b.routers[0].experts.w, ema.routers[0].experts.w)


def test_mismatches_are_named():
    sd = official_state_dict(tiny("Switch-DiT-S/2"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_official(tiny("Switch-DiT-S/2", hidden_size=32), sd)
    with pytest.raises(ValueError, match="prior._unit_mapping"):
        load_official(tiny("Switch-DiT-S/2", num_experts=4), sd)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_official(tiny("DiT-S/2"), {k: v for k, v in sd.items() if k not in ("prior._unit_mapping", "full_time")})
    with pytest.raises(ValueError, match="missing keys"):
        load_official(tiny("Switch-DiT-S/2"), official_state_dict(tiny("DiT-S/2")))
    with pytest.raises(ValueError, match="full_time"):
        load_official(tiny("Switch-DiT-S/2", num_timesteps=60), sd)
    with pytest.raises(ValueError, match="DTR"):
        load_official(tiny("DiT-S/2"), official_state_dict(tiny("DTR-S/2")))
    with pytest.raises(KeyError, match="ema"):
        load_official(tiny("DiT-S/2"), {"model": official_state_dict(tiny("DiT-S/2"))}, ema=True)
