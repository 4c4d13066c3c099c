"""Shared fixtures: a tiny random UNet (built from a config here, no download), a random space, and the
released w2w files' formats written the way the original code reads and writes them."""
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from tqdm.std import TqdmDefaultWriteLock, tqdm

from lora_w2w.layout import LoraLayout
from lora_w2w.space import Space

# The toy models are so small that handing work between threads costs more than it saves.
torch.set_num_threads(1)

# test_interrupt and test_outputs fork children of this process. tqdm's default write lock is a process
# lock (a semaphore the forks share) and its monitor thread takes the lock every 10 s: a child interrupted
# while holding it, or a fork while the monitor held it, left every later bar of every child waiting
# forever (a full run hung in test_interrupt). One thread lock per process and no monitor thread instead.
TqdmDefaultWriteLock.mp_lock = None
tqdm.monitor_interval = 0

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


def make_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


def unet_pipeline(unet):
    """A pipeline holding only the UNet: enough for diffusers' load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def unet_inputs():
    """sample (B, 4, 8, 8), timesteps (B,), text embeddings (B, 5, 16)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)


def make_space(layout: LoraLayout, k: int, m: int = 12, seed: int = 0, dtype=torch.float32) -> Space:
    """A random space: orthonormal components (k, N), positive std, m dataset models with attributes."""
    g = torch.Generator().manual_seed(seed)
    n = layout.numel
    components = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].T.to(dtype)  # (k, N)
    mean = (0.01 * torch.randn(n, generator=g)).to(dtype)
    std = (0.02 + 0.01 * torch.rand(n, generator=g)).to(dtype)
    coefficients = torch.randn(m, k, generator=g).to(dtype)
    attributes = pd.DataFrame({"Male": [1, -1] * (m // 2), "Bald": [-1] * m},
                              index=pd.Index([f"{i:06d}" for i in range(m)], name="name"))
    return Space(mean, std, components, layout, coefficients, attributes, base_model="tiny-test")


@pytest.fixture
def layout(unet):
    return LoraLayout.from_unet(unet)


@pytest.fixture
def space(layout):
    return make_space(layout, k=6)


# ----------------------------------------------------------------------------- photographs that ship in packages

@pytest.fixture(scope="session")
def astronaut():
    """Eileen Collins (NASA, public domain), shipped in the scikit-image wheel: skimage/data/astronaut.png."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def grace_hopper():
    """Grace Hopper (US Navy, public domain), shipped in the matplotlib wheel: mpl-data/sample_data/grace_hopper.jpg."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return image.convert("RGB")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A randomly initialised tiny pipeline (32 px, the tiny world's architecture at toy width) saved as a
    diffusers folder, and 3 identities of 4 faces each."""
    from lora_w2w.tiny.synthetic import write_dataset
    from lora_w2w.tiny.base_model import TinyPipelineConfig, build_pipeline, save_pipeline

    root = tmp_path_factory.mktemp("toy_world")
    config = TinyPipelineConfig(image_size=32, text_hidden=32, text_layers=1, text_heads=2, vae_channels=(16, 16, 16),
                                unet_channels=(32, 32, 32), norm_num_groups=8)
    save_pipeline(build_pipeline(config, seed=0), root / "base")
    write_dataset(root / "faces", 3, first_seed=0, images_per_identity=4, size=32, progress=False)
    return root


@pytest.fixture(scope="session")
def toy_space(toy_world, tmp_path_factory):
    """A random space (K = 16, M = 60 with every attribute of the tiny world) for the toy pipeline's
    UNet; its std is scaled so that its models visibly change the toy UNet."""
    from lora_w2w.storage import save_space
    from lora_w2w.tiny.synthetic import ATTRIBUTES

    unet = UNet2DConditionModel.from_pretrained(toy_world / "base", subfolder="unet")
    space = make_space(LoraLayout.from_unet(unet), k=16, m=60, seed=0)
    space.std *= 20
    signs = torch.randint(0, 2, (60, len(ATTRIBUTES)), generator=torch.Generator().manual_seed(0)) * 2 - 1
    space.attributes = pd.DataFrame(signs.numpy(), columns=list(ATTRIBUTES),
                                    index=pd.Index([f"{i:06d}" for i in range(60)], name="name"))
    path = tmp_path_factory.mktemp("toy_space") / "space"
    save_space(space, path)
    return path


# ----------------------------------------------------------------------------- the released files' formats

def write_weight_dimensions(layout: LoraLayout, path) -> dict:
    """weight_dimensions.pt as released: {PEFT key: [t.flatten().shape, t.shape]}, keys in the order peft's
    `load_peft_weights` gives them for the layout's adapter_model.safetensors. The original reads each
    value as `weight_dimensions[key][0][0]` (numel) and `weight_dimensions[key][1]` (shape) in utils.py's
    save_model_for_diffusers and unflatten."""
    from peft.utils import load_peft_weights

    from lora_w2w.formats import save_peft

    with tempfile.TemporaryDirectory() as tmp:
        save_peft(layout, torch.zeros(layout.numel), Path(tmp) / "lora")
        state = load_peft_weights(str(Path(tmp) / "lora"), device="cpu")
    dimensions = {key: [t.flatten().shape, t.shape] for key, t in state.items()}
    torch.save(dimensions, path)
    return dimensions


def write_adapter_config(layout: LoraLayout, path) -> None:
    """adapter_config.json as PEFT writes it for the released LoRAs (rank 1, lora_alpha 27, to_q and to_v)."""
    from peft import LoraConfig

    config = LoraConfig(r=layout.rank, lora_alpha=layout.alpha, target_modules=list(layout.target_modules)).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    Path(path).write_text(json.dumps(config))


def write_released_files(src: Path, layout: LoraLayout, k: int, m: int, seed: int = 0) -> dict:
    """The released files for `layout` with K = k components and M = m models: mean.pt, std.pt, V.pt (N x K),
    proj_1000pc.pt (M x k), pinverse_1000pc.pt, weight_dimensions.pt, identity_df.pt, adapter_config.json and a
    w2wmodel.pt (1 x K). Returns the tensors and the attribute frame by file stem."""
    g = torch.Generator().manual_seed(seed)
    n = layout.numel
    files = {"mean": 0.01 * torch.randn(n, generator=g), "std": 0.01 + torch.rand(n, generator=g),
             "V": torch.linalg.qr(torch.randn(n, k, generator=g))[0],  # (N, K), orthonormal columns
             "proj_1000pc": torch.randn(m, k, generator=g), "w2wmodel": torch.randn(1, k, generator=g)}
    files["pinverse_1000pc"] = torch.linalg.pinv(files["proj_1000pc"])
    for stem, tensor in files.items():
        torch.save(tensor, src / f"{stem}.pt")
    files["identity_df"] = pd.DataFrame({"Male": [1, -1] * (m // 2), "Eyeglasses": [-1] * (m - 1) + [1]})
    torch.save(files["identity_df"], src / "identity_df.pt")
    files["weight_dimensions"] = write_weight_dimensions(layout, src / "weight_dimensions.pt")
    write_adapter_config(layout, src / "adapter_config.json")
    return files


def write_original_lora(weights: torch.Tensor, weight_dimensions: dict, folder: Path, adapter_config: Path) -> Path:
    """A LoRA folder as the original's utils.save_model_for_diffusers writes one: weights (N,) cut by
    `weight_dimensions[key][0][0]` and unflattened to `weight_dimensions[key][1]`, keys renamed to the
    adapter `identity1` (`...lora_A.identity1.weight`) and sorted, saved as
    `<folder>/unet/adapter_model.safetensors` beside a copy of the released adapter_config.json."""
    state, counter = {}, 0
    for key, (numel, shape) in weight_dimensions.items():
        state[key.replace(".weight", ".identity1.weight")] = weights[counter:counter + numel[0]].unflatten(0, shape)
        counter += numel[0]
    (folder / "unet").mkdir(parents=True)
    shutil.copyfile(adapter_config, folder / "unet" / "adapter_config.json")
    save_file(dict(sorted(state.items())), folder / "unet" / "adapter_model.safetensors")
    return folder
