"""The four ways of applying w2w weights to a UNet give the same output, and gradients reach the
coefficients only."""
import copy

import pytest
import torch
from conftest import make_space, make_unet, unet_pipeline
from peft import PeftModel

from lora_w2w.errors import LayoutError, SpaceError
from lora_w2w.formats import save_kohya, save_peft
from lora_w2w.layout import LoraLayout
from lora_w2w.network import FusedLora, LoraUNet


def test_differentiable_fused_peft_and_kohya_agree(unet, unet_inputs, space, tmp_path):
    coefficients = 3 * torch.randn(space.num_components)
    weights = space.unproject(coefficients)  # (N,)
    with torch.no_grad():
        base = unet(*unet_inputs).sample
        with FusedLora(unet, space.layout, weights):
            fused = unet(*unet_inputs).sample
        assert torch.equal(unet(*unet_inputs).sample, base)  # removal restores the weights exactly
        differentiable = LoraUNet(copy.deepcopy(unet), space.layout)(weights, *unet_inputs).sample

        save_peft(space.layout, weights, tmp_path / "peft")
        save_kohya(space.layout, weights, tmp_path / "kohya.safetensors")
        outputs = {}
        for name, path in (("peft", tmp_path / "peft"), ("kohya", tmp_path / "kohya.safetensors")):
            pipe = unet_pipeline(copy.deepcopy(unet))
            pipe.load_lora_weights(str(path))
            outputs[name] = pipe.unet(*unet_inputs).sample
        peft_model = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "peft"))
        outputs["PeftModel"] = peft_model.base_model.model(*unet_inputs).sample

    assert (fused - base).abs().max() > 1e-2  # the LoRA does change the output
    torch.testing.assert_close(differentiable, fused, rtol=1e-5, atol=1e-5)
    for name, output in outputs.items():
        torch.testing.assert_close(output, fused, rtol=1e-5, atol=1e-5, msg=name)


def test_gradients_reach_only_the_coefficients_and_match_finite_differences(unet_inputs):
    unet = make_unet().double()
    layout = LoraLayout.from_unet(unet)
    space = make_space(layout, k=4, dtype=torch.float64)
    lora_unet = LoraUNet(unet, layout)
    sample, t, text = (x.double() if x.is_floating_point() else x for x in unet_inputs)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}

    def loss(c):
        return lora_unet(space.unproject(c), sample, t, text).sample.square().mean()

    coefficients = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss(coefficients).backward()
    assert all(p.grad is None for p in unet.parameters())
    eps = 1e-6
    for i in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[i] = eps
        with torch.no_grad():
            numeric = (loss(coefficients + step) - loss(coefficients - step)) / (2 * eps)
        assert coefficients.grad[i].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-9)
    assert all(torch.equal(v, base_state[k]) for k, v in unet.state_dict().items() if "lora_" not in k)


def test_a_space_for_another_unet_is_refused_before_any_work(space):
    other = make_unet(cross_attention_dim=24)
    with pytest.raises(LayoutError, match="does not fit this UNet"):
        FusedLora(other, space.layout, torch.zeros(space.num_weights))
    with pytest.raises(LayoutError, match="does not fit this UNet"):
        LoraUNet(other, space.layout)


def test_fusing_refuses_nan(unet, space):
    weights = torch.zeros(space.num_weights)
    weights[5] = float("inf")
    before = copy.deepcopy(unet.state_dict())
    with pytest.raises(SpaceError, match="NaN/inf"):
        FusedLora(unet, space.layout, weights)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_fused_scale_is_linear(unet, unet_inputs, space):
    weights = space.unproject(torch.randn(space.num_components))
    layer = space.layout.layers[0]
    linear = unet.get_submodule(layer.name)
    original = linear.weight.detach().clone()
    lora_a, lora_b = space.layout.split(weights)[layer.name]
    with FusedLora(unet, space.layout, weights, scale=0.5):
        torch.testing.assert_close(linear.weight - original, 0.5 * 27 * lora_b @ lora_a)


def test_differentiable_weights_stack_on_a_loaded_lora_and_removal_restores_it(unet, unet_inputs, space, tmp_path):
    loaded, extra = (space.unproject(3 * torch.randn(space.num_components)) for _ in range(2))
    save_peft(space.layout, loaded, tmp_path / "peft")
    pipe = unet_pipeline(unet)
    pipe.load_lora_weights(str(tmp_path / "peft"))
    name = space.layout.layers[0].name
    peft_layer, linear = unet.get_submodule(name), unet.get_submodule(name).base_layer
    with torch.no_grad():
        with_loaded = unet(*unet_inputs).sample
        lora_unet = LoraUNet(unet, space.layout)
        stacked = lora_unet(extra, *unet_inputs).sample
        lora_unet.remove()
        assert unet.get_submodule(name) is peft_layer and peft_layer.base_layer is linear
        torch.testing.assert_close(unet(*unet_inputs).sample, with_loaded, rtol=0, atol=0)
        with FusedLora(unet, space.layout, extra):
            expected = unet(*unet_inputs).sample
    torch.testing.assert_close(stacked, expected, rtol=1e-5, atol=1e-5)
    assert (stacked - with_loaded).abs().max() > 1e-3  # the extra weights do count
