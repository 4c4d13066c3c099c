"""The tiny Stable Diffusion pipeline: SD1.5's architecture (CLIP BPE tokenizer, CLIP text encoder,
KL autoencoder, UNet with cross-attention transformer blocks, DDIM scheduler) at CPU size, for
64 x 64 faces with 4 x 16 x 16 latents.

    pipe = build_pipeline(TinyPipelineConfig(), seed=0)   # random weights; train_base.py trains them
    save_pipeline(pipe, DEFAULT_BASE)                      # defaults.DEFAULT_BASE: files/tiny/base
    pipe = load_pipeline(DEFAULT_BASE)                    # exactly as realistic-vision is loaded
    image = pipe("a photo of a young man with glasses", num_inference_steps=25).images[0]
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5TokenizerFast

from ..storage import Output, atomic_output, holds

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's pad and unknown token
END_OF_WORD = "</w>"
PIPELINE_FOLDER = Output("diffusers pipeline folder", folder=True, owns=holds("model_index.json"))


# -----------------------------------------------------------------------------
# tokenizer: a real CLIP byte-level BPE whose vocabulary is the tiny world's words


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_TRANSLATION = str.maketrans({chr(b): c for b, c in _bytes_to_unicode().items()})  # latin-1 char -> CLIP char


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al., 2016) learnt on `words` until each word is one symbol."""
    segments = {w: [*w[:-1], w[-1] + END_OF_WORD] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = collections.Counter(p for s in segments.values() for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties broken alphabetically
        merges.append(best)
        for word, s in segments.items():
            merged, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    merged.append(s[i] + s[i + 1])
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            segments[word] = merged


def build_tokenizer(words, out_dir: str | os.PathLike, max_length: int = 32) -> CLIPTokenizer:
    """Write a CLIP BPE vocabulary (`vocab.json`, `merges.txt`) in which every word of `words` is one
    token, and load it as a `CLIPTokenizer`. Other words still tokenize, into characters.

    The vocabulary is laid out as CLIP's: the 256 byte characters, the same with `</w>`, the merges'
    results, then `<|startoftext|>` and `<|endoftext|>`.
    """
    words = sorted({w.lower() for w in words})
    bad = [w for w in words if not w.isalpha()]
    if bad:
        raise ValueError(f"build_tokenizer: words must be letters only (CLIP splits at anything else), got {bad}")
    chars = list(_bytes_to_unicode().values())
    merges = _learn_merges([w.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION) for w in words])
    tokens = [*chars, *(c + END_OF_WORD for c in chars), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_vocab_and_merges(out_dir, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=max_length, local_files_only=True)
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert not split, f"BPE failed to make these words single tokens: {split}"
    return tokenizer


def build_t5_tokenizer(words) -> T5TokenizerFast:
    """A T5 tokenizer over `words`, made as T5's own is (a SentencePiece Unigram model: `<pad>` 0, `</s>` 1,
    `<unk>` 2, then one piece per word, after the `\u2581` that marks a word's start; `</s>` ends every text),
    in memory: FLUX's second tokenizer without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{word}", -1.0) for word in sorted(set(words)))]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0)


def _write_vocab_and_merges(out_dir: Path, vocab: dict[str, int], merges) -> None:
    """The two files of CLIP's original (slow) tokenizer, which transformers 4 needs."""
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# -----------------------------------------------------------------------------
# config and construction


@dataclass
class TinyPipelineConfig:
    """Sizes of the tiny pipeline. Defaults: UNet 2.14 M, text encoder 0.19 M, VAE 0.95 M parameters
    (13 MB of float32 safetensors); a training step of UNet + text encoder, batch 32, ~0.55 s on 2 cores."""

    image_size: int = 64
    # text encoder (CLIP): tiny width, but a real transformer trained jointly with the UNet
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 32  # tokens, incl. start and end; the longest tiny-world caption fits
    # VAE: len(vae_channels) - 1 = 2 downsamplings, 64 x 64 -> 16 x 16
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    # UNet: cross-attention at 16 x 16 (like SD1.5 at 64 x 64) and 8 x 8; plain ResNets at 4 x 4
    unet_channels: tuple[int, ...] = (64, 64, 64)
    unet_down_blocks: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    unet_up_blocks: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet_layers_per_block: int = 1
    unet_heads: int = 4  # diffusers' `attention_head_dim` (which SD1.5 uses as the number of heads)
    norm_num_groups: int = 32
    # noise schedule of SD1.5
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self):
        levels = len(self.vae_channels) - 1
        assert self.image_size % 2**levels == 0, f"image_size {self.image_size} not divisible by 2**{levels}"
        assert len(self.unet_down_blocks) == len(self.unet_channels) == len(self.unet_up_blocks), (
            f"unet_down_blocks {self.unet_down_blocks}, unet_channels {self.unet_channels} and "
            f"unet_up_blocks {self.unet_up_blocks} must have one entry per level"
        )
        assert self.unet_down_blocks[0] == "CrossAttnDownBlock2D", (
            f"unet_down_blocks[0] is {self.unet_down_blocks[0]}: the highest latent resolution needs cross-attention"
        )

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def _scheduler_kwargs(config: TinyPipelineConfig) -> dict:
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
    )


def training_scheduler(config: TinyPipelineConfig) -> DDPMScheduler:
    """The DDPM noise schedule the UNet is trained with (epsilon prediction, 1000 steps)."""
    return DDPMScheduler(**_scheduler_kwargs(config), prediction_type="epsilon", clip_sample=False)


def build_pipeline(config: TinyPipelineConfig, seed: int, tokenizer: CLIPTokenizer | None = None):
    """A randomly initialised tiny `StableDiffusionPipeline` with SD1.5's component classes.

    `tokenizer` defaults to one built by `build_tokenizer` on the tiny world's caption words.
    """
    if tokenizer is None:
        from lora_w2w.tiny.synthetic import CAPTION_WORDS

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_tokenizer(CAPTION_WORDS, tmp, max_length=config.max_length)
    assert tokenizer.model_max_length == config.max_length, (
        f"tokenizer.model_max_length {tokenizer.model_max_length} != config.max_length {config.max_length}"
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=4 * config.text_hidden,
            projection_dim=config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size,
        scaling_factor=1.0,  # set from the trained encoder's latent std by train_base.py
    )
    unet = UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=config.unet_down_blocks,
        up_block_types=config.unet_up_blocks,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        attention_head_dim=config.unet_heads,
        cross_attention_dim=config.text_hidden,
        norm_num_groups=config.norm_num_groups,
    )
    scheduler = DDIMScheduler(
        **_scheduler_kwargs(config), clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# saving and loading


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: str | os.PathLike, extra_files: dict | None = None) -> None:
    """Write `pipe` as a diffusers folder (float32 safetensors), replacing `out_dir` only once complete.
    The tokenizer folder also gets CLIP's `vocab.json` and `merges.txt` (transformers 5 writes only
    `tokenizer.json`; transformers 4 needs them). `extra_files` maps file names to bytes written
    beside `model_index.json`.
    """
    with atomic_output(out_dir, PIPELINE_FOLDER) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        backend = json.loads(pipe.tokenizer.backend_tokenizer.to_str())["model"]
        merges = [m.split(" ") if isinstance(m, str) else m for m in backend["merges"]]
        _write_vocab_and_merges(tmp / "tokenizer", backend["vocab"], merges)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)


def load_pipeline(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a saved pipeline offline, exactly as a Stable Diffusion 1.5 checkpoint is loaded."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(
        path, dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
