import json
from pathlib import Path

import pytest
import torch
from conftest import make_unet

from lora_w2w.errors import LayoutError
from lora_w2w.layout import LoraLayout, parse_peft_key, sd15_layout

REFERENCE = json.loads((Path(__file__).parent / "data" / "sd15_lora_layout.json").read_text())


def test_sd15_layout_from_meta_unet_equals_reference():
    layout = sd15_layout()
    assert len(layout) == 64
    assert layout.numel == REFERENCE["num_params"] == 99_648
    assert [(l.name, l.in_features, l.out_features) for l in layout.layers] == [
        (m["name"], m["in_features"], m["out_features"]) for m in REFERENCE["modules"]]
    assert (layout.rank, layout.alpha, layout.scaling) == (1, 27.0, 27.0)


def test_order_is_peft_keys_sorted_as_strings():
    keys = sd15_layout().peft_keys()
    assert keys == sorted(keys)
    assert keys[0] == "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert keys[1].endswith("attn1.to_q.lora_B.weight") and keys[2].endswith("attn1.to_v.lora_A.weight")
    assert keys[-1].startswith("base_model.model.up_blocks.3.")


def test_split_join_round_trip_and_offsets(layout):
    weights = torch.arange(layout.numel, dtype=torch.float32)
    parts = layout.split(weights)
    first = layout.layers[0]
    lora_a, lora_b = parts[first.name]
    assert lora_a.shape == (1, first.in_features) and lora_b.shape == (first.out_features, 1)
    assert lora_a[0, 0] == 0 and lora_b[0, 0] == first.in_features  # A first, then B, row-major
    assert torch.equal(layout.join(parts), weights)


def test_split_batched_and_rank_two(unet):
    layout = LoraLayout.from_unet(unet, rank=2, alpha=4)
    batch = torch.randn(3, layout.numel)
    parts = layout.split(batch)
    lora_a, lora_b = parts[layout.layers[0].name]
    assert lora_a.shape == (3, 2, layout.layers[0].in_features)
    assert torch.equal(layout.join(parts), batch)
    for i in range(3):  # the batch split equals splitting each row
        assert torch.equal(layout.split(batch[i])[layout.layers[0].name][1], lora_b[i])


def test_layout_from_weight_dimensions_and_dict(layout):
    dims = {key: (t.numel(), torch.Size(t.shape)) for key, t in layout.to_peft_state_dict(torch.zeros(layout.numel)).items()}
    assert LoraLayout.from_weight_dimensions(dims) == layout
    assert LoraLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_peft_state_dict_round_trip_any_prefix(layout):
    weights = torch.randn(layout.numel)
    state = layout.to_peft_state_dict(weights)
    assert torch.equal(layout.from_peft_state_dict(state), weights)
    diffusers_style = {k.replace("base_model.model.", "unet.").replace(".weight", ".default.weight"): v
                       for k, v in state.items()}
    assert torch.equal(layout.from_peft_state_dict(diffusers_style), weights)


def test_bad_inputs_name_what_is_wrong(layout):
    with pytest.raises(LayoutError, match=f"expects N = {layout.numel}"):
        layout.split(torch.zeros(layout.numel + 1))
    state = layout.to_peft_state_dict(torch.zeros(layout.numel))
    state.pop(next(iter(state)))
    with pytest.raises(LayoutError, match="lacks lora_A or lora_B"):
        layout.from_peft_state_dict(state)
    with pytest.raises(LayoutError, match="not a LoRA weight key"):
        parse_peft_key("conv_in.weight")
    other = LoraLayout.from_unet(make_unet(cross_attention_dim=24))
    assert "attn2.to_v (16->32) vs" in layout.describe_mismatch(other)
    assert layout.describe_mismatch(layout) is None
