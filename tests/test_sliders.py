"""Concept-Sliders-style text sliders on the toy pipeline: the guided targets, the negated LoRA, and a
trained slider that moves the model's prediction along eps(c+) - eps(c-). About 10 s."""
import pytest
import torch
import torch.nn.functional as F

from lora_w2w.diffusion import encode_prompt
from lora_w2w.errors import W2WError
from lora_w2w.layout import LoraLayout
from lora_w2w.network import LoraUNet
from lora_w2w.sliders import SliderConfig, negate, slider_targets, train_slider
from lora_w2w.tiny.base_model import load_pipeline

POSITIVE, NEGATIVE, TARGET = "a photo of a man", "a photo of a woman", "a photo of a person"


def test_targets_and_negation(layout):
    g = torch.Generator().manual_seed(0)
    eps_t, eps_p, eps_n = torch.randn(3, 2, 4, 8, 8, generator=g)
    up, down = slider_targets(eps_t, eps_p, eps_n, eta=2.0)
    assert torch.allclose(up - eps_t, 2 * (eps_p - eps_n), atol=1e-6)
    assert torch.allclose(up + down, 2 * eps_t, atol=1e-6)
    weights = torch.randn(layout.numel, generator=g)
    for (a, b), (a_neg, b_neg) in zip(layout.split(weights).values(), layout.split(negate(layout, weights)).values()):
        assert torch.equal(a_neg, a) and torch.allclose(b_neg @ a_neg, -(b @ a))  # the weight change flips
    with pytest.raises(W2WError, match="slider steps must be positive"):
        SliderConfig(steps=0)


@pytest.mark.slow
def test_a_trained_slider_moves_along_the_prompt_pair(toy_world):
    pipe = load_pipeline(toy_world / "base")
    layout = LoraLayout.from_unet(pipe.unet, rank=4, alpha=4)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (P, C, h, w)
    slider = train_slider(pipe, layout, POSITIVE, NEGATIVE, TARGET, latents,
                          SliderConfig(steps=30, lr=1e-2, eta=4.0), progress=False)
    g = torch.Generator().manual_seed(2)
    noisy, t = torch.randn(8, 4, 8, 8, generator=g), torch.randint(1000, (8,), generator=g)
    embed = {p: encode_prompt(pipe.tokenizer, pipe.text_encoder, p).expand(8, -1, -1)  # (B, L, D)
             for p in (POSITIVE, NEGATIVE, TARGET)}
    with torch.no_grad():
        base = {p: pipe.unet(noisy, t, e).sample for p, e in embed.items()}
        lora_unet = LoraUNet(pipe.unet, layout)
        moved = lora_unet(slider, noisy, t, embed[TARGET]).sample - base[TARGET]
        flipped = lora_unet(negate(layout, slider), noisy, t, embed[TARGET]).sample - base[TARGET]
        lora_unet.remove()
    direction = (base[POSITIVE] - base[NEGATIVE]).flatten()
    assert F.cosine_similarity(moved.flatten(), direction, dim=0) > 0.3
    assert F.cosine_similarity(flipped.flatten(), direction, dim=0) < -0.3
