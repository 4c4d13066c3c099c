import json
from pathlib import Path

import pytest
import torch
from conftest import make_unet, write_weight_dimensions

from lora_w2w.errors import FileFormatError, LayoutError
from lora_w2w.layout import LoraLayer, LoraLayout, parse_peft_key, sd15_layout

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


def test_layout_from_weight_dimensions_and_dict(layout, tmp_path):
    dims = write_weight_dimensions(layout, tmp_path / "weight_dimensions.pt")
    assert LoraLayout.from_weight_dimensions(torch.load(tmp_path / "weight_dimensions.pt", weights_only=True)) == layout
    assert list(dims) == layout.peft_keys()
    assert LoraLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


@pytest.mark.parametrize("numel", [lambda n: torch.Size([n]), lambda n: n, lambda n: [n], lambda n: (n,),
                                   lambda n: torch.tensor([n]), lambda n: torch.tensor(n)])
@pytest.mark.parametrize("shape", [torch.Size, list, tuple])
def test_every_form_of_a_weight_dimensions_value_is_read(layout, numel, shape):
    state = layout.to_peft_state_dict(torch.zeros(layout.numel))
    dims = {key: [numel(t.numel()), shape(t.shape)] for key, t in state.items()}
    assert LoraLayout.from_weight_dimensions(dims) == layout


@pytest.mark.parametrize("value, expected", [
    ([torch.Size([16, 1]), torch.Size([1, 16])], "numel an int, a 1-element"),
    ([16.0, torch.Size([1, 16])], "numel an int, a 1-element"),
    ([torch.tensor([16.0]), torch.Size([1, 16])], "numel an int, a 1-element"),
    ([True, torch.Size([1, 16])], "numel an int, a 1-element"),
    ([torch.Size([16]), "1x16"], "shape a torch.Size, list or tuple of ints"),
    ([torch.Size([16]), torch.Size([1, 8])], "(numel 16, shape (1, 8))"),
    ([torch.Size([16]), torch.Size([16])], "a 2-d shape"),
    ((16,), "(a list or tuple of two)"),
    (16, "(a list or tuple of two)"),
])
def test_a_malformed_weight_dimensions_value_names_key_and_value(layout, value, expected):
    state = layout.to_peft_state_dict(torch.zeros(layout.numel))
    dims = {key: [torch.Size([t.numel()]), t.shape] for key, t in state.items()}
    key = next(iter(dims))
    dims[key] = value
    with pytest.raises(FileFormatError) as error:
        LoraLayout.from_weight_dimensions(dims, source="w.pt")
    message = str(error.value)
    assert message.startswith(f"w.pt[{key!r}] = {' '.join(repr(value).split())}: expected [numel, shape]")
    assert expected in message and "\n" not in message


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
    with pytest.raises(LayoutError, match=r"has \['lora_B'\], expected lora_A and lora_B"):
        layout.from_peft_state_dict(state)
    with pytest.raises(LayoutError, match="not a LoRA weight key"):
        parse_peft_key("conv_in.weight")
    other = LoraLayout.from_unet(make_unet(cross_attention_dim=24))
    assert "attn2.to_v (16->32) vs" in layout.describe_mismatch(other)
    assert layout.describe_mismatch(layout) is None
    with pytest.raises(FileFormatError, match=r"w.pt: expected a dict PEFT key -> \[numel, shape\], got list"):
        LoraLayout.from_weight_dimensions([], source="w.pt")


def test_any_single_adapter_name_is_read_and_two_are_refused_naming_them(layout):
    weights = torch.randn(layout.numel)
    state = layout.to_peft_state_dict(weights)
    assert parse_peft_key("base_model.model.a.to_q.lora_A.identity1.weight") == ("a.to_q", "lora_A", "identity1")
    original = {k.replace(".weight", ".identity1.weight"): v for k, v in state.items()}  # the original's adapter name
    assert torch.equal(layout.from_peft_state_dict(original), weights)
    two = {**original, **{k.replace(".weight", ".other.weight"): v for k, v in state.items()}}
    with pytest.raises(LayoutError, match=r"^2 adapters in one LoRA \('identity1', 'other'\); expected one"):
        layout.from_peft_state_dict(two)
    with pytest.raises(LayoutError, match=r"\(one without a name, 'identity1'\)"):
        layout.from_peft_state_dict({**state, **original})
    unet_prefixed = {k.replace("base_model.model.", "unet."): v for k, v in state.items()}
    with pytest.raises(LayoutError, match=r"are both lora_A of layer"):
        layout.from_peft_state_dict({**state, **unet_prefixed})


def test_a_lora_of_another_layout_is_refused_naming_the_first_difference(layout):
    first, second = layout.layers[0], layout.layers[1]
    rank2 = LoraLayout(layout.layers, rank=2)
    with pytest.raises(LayoutError, match=r"of rank 1\): rank 2, expected 1"):
        layout.check_fits(rank2)
    missing = f"layer {first.name} \\({first.in_features}->{first.out_features}\\) is missing"
    with pytest.raises(LayoutError, match=missing):
        layout.check_fits(LoraLayout(layout.layers[1:]))
    wider = LoraLayout((first, LoraLayer(second.name, second.in_features + 1, second.out_features), *layout.layers[2:]))
    with pytest.raises(LayoutError, match=f"layer {second.name} is {second.in_features + 1}->{second.out_features}, "
                                          f"expected {second.in_features}->{second.out_features}"):
        layout.check_fits(wider)
    with pytest.raises(LayoutError, match="1 layers not in the layout, e.g. extra.to_q"):
        layout.check_fits(LoraLayout((*layout.layers, LoraLayer("extra.to_q", 4, 4))))
    layout.check_fits(LoraLayout(tuple(reversed(layout.layers))))  # the order of a file's keys does not matter
