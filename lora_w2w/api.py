"""The object layer: diffusers-style methods of `Space` and `W2WModel`, each one call of a library function.

    from lora_w2w import Space, image_grid, load_base_pipeline

    space = Space.from_pretrained("files/tiny/space")  # a space folder, or the hub id of a repository holding one
    model = space.sample(seed=3)            # W2WModel(space=48cd7cd62b7ec589, K=250, made_by='sample seed 3')
    edited = model.edit({"Beard": 3.0}, debias=["Male"])  # friendly names (editing.attribute_names), dataset stds
    edited.save("edited.safetensors")                  # its provenance in the file's metadata
    edited.save_lora("edited_kohya.safetensors", format="kohya")
    pipe = load_base_pipeline("files/tiny/base")
    face = space.invert(pipe, "face.png", "face_mask.png", preset="real")  # on a Workbench around pipe
    images = edited.generate(pipe, seeds=[0, 1, 2, 3])  # fused into the UNet, as every front end generates
    edited.load_into(pipe)                             # or as a diffusers LoRA adapter: pipe("sks person")

A model knows its space when the space made it (sample, edit, inversion), or once it is given: to
`W2WModel.load(path, space)`, or as `space=` to any method, which the model then keeps. Underneath:
sampling's `iter_sample_models`, editing's `attribute_directions` and `apply_edits`, `storage`,
`pipeline.generate`, and for inversion and LoRA files the Workbench (the front ends' engine) around the
caller's pipeline: `Workbench.invert`, `Workbench.export`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path


class SpaceMethods:
    """The object layer of `space.Space`."""

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, k: int | None = None, revision: str | None = None):
        """A space from its folder, or from the Hugging Face repository `path_or_hub_id` (OWNER/NAME) whose top
        holds one (space.json, space.safetensors, attributes.csv; fetched into huggingface_hub's cache at
        `revision`); memory-mapped, its first `k` components when given (`storage.load_space`)."""
        from .download import download_space
        from .provenance import HUB_ID
        from .storage import load_space

        path = Path(path_or_hub_id)
        if path.exists() or not HUB_ID.fullmatch(str(path_or_hub_id)):
            return load_space(path, k)
        return load_space(download_space(str(path_or_hub_id), revision), k)

    def sample(self, seed: int = 0, components: int | None = None, factor: float = 1.0):
        """The first model drawn with `seed` (the paper's sampling, `sampling.iter_sample_models`): a new identity
        on the first `components` coefficients (default 1,000, or all the dataset has), std scaled by `factor`."""
        from .sampling import iter_sample_models

        model, = iter_sample_models(self, 1, seed, components, factor)
        return model

    def invert(self, pipe, images, masks=None, *, preset: str = "real", steps: int | None = None, **options):
        """The model of this space that reproduces `images` (photographs of one person: files or PIL images, or
        one of them) inside `masks`, with the settings of `preset` on this space ("real", or "ood" for paintings)
        and `steps` when given; `options`: those of `Workbench.invert` (crop, auto_mask, seed, checkpoint ...).
        It runs on a Workbench around `pipe` (`Workbench.around`), as `w2w invert` does."""
        from .workbench import Workbench

        bench = Workbench.around(pipe, self)
        model, _ = bench.invert(images, masks, bench.inversion_config(preset, steps=steps), preset=preset, **options)
        return model

    def attribute_names(self) -> list[str]:
        """The names edits take, friendly ones with the sign folded in (`editing.attribute_names`)."""
        from .editing import attribute_names

        return attribute_names(self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the space to `directory` (`storage.save_space`)."""
        from .storage import save_space

        return save_space(self, directory)

    def __repr__(self) -> str:
        attributes = 0 if self.attributes is None else len(self.attributes.columns)
        return (f"Space(id={self.id!r}, N={self.num_weights:,}, K={self.num_components:,}, M={self.num_models:,}, "
                f"base_model={self.base_model!r}, prompt={self.prompt!r}, attributes={attributes})")


class ModelMethods:
    """The object layer of `space.W2WModel`."""

    @classmethod
    def load(cls, path: str | os.PathLike, space=None):
        """A model file (the project's .safetensors or the original w2wmodel.pt), knowing `space` when given
        (`storage.load_model`)."""
        from .storage import load_model

        model = load_model(path)
        return model if space is None else model.using(space)

    def using(self, space):
        """This model, knowing `space` (checked: the model's own space, and no more coefficients than K)."""
        return dataclasses.replace(self, space=space)

    def known_space(self, space=None):
        """`space` when given (checked, and kept by the model from then on), else the space the model knows."""
        from .errors import SpaceError

        if space is not None:
            self.check_space(space)
            self.space = space
        if self.space is None:
            raise SpaceError("the model knows no space: pass space=SPACE once, or load it with "
                             "W2WModel.load(path, space)")
        return self.space

    @property
    def made_by(self) -> str:
        """How the model was made, in words ('sample seed 3; edit Beard +3 (debias Male)'); '' when not recorded."""
        from .provenance import describe

        return describe(self.provenance)

    def edit(self, strengths: dict[str, float], debias=None, *, space=None, components: int | None = None,
             method: str | None = None, debias_mode: str = "project"):
        """The model moved by strengths[a] standard deviations of the dataset along each attribute a's direction
        (friendly names or the attribute table's), debiased against `debias` (default: editing.DEFAULT_DEBIAS,
        those the space has); `editing.attribute_directions` and `apply_edits`."""
        from .editing import DEFAULT_DIRECTION_METHOD, apply_edits, attribute_directions, debias_or_default

        space = self.known_space(space)
        directions = attribute_directions(space, list(strengths), components, method or DEFAULT_DIRECTION_METHOD,
                                          debias_or_default(space, debias), debias_mode)
        return apply_edits(self, strengths, directions)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file `path` (.safetensors), its provenance in the metadata (`storage.save_model`)."""
        from .storage import save_model

        return save_model(self, path)

    def save_lora(self, path: str | os.PathLike, format: str = "peft", *, space=None, pipe=None) -> Path:
        """Write the model as a LoRA: 'peft' (a folder for diffusers and PEFT, with a model card) or 'kohya' (one
        .safetensors for A1111 and ComfyUI, with ModelSpec's keys), as `Workbench.export` writes it: with `pipe`,
        the base pipeline, its keys as its family names them and its resolution recorded; else Stable
        Diffusion 1's names."""
        from .workbench import Workbench

        space = self.known_space(space)
        bench = Workbench(None, space) if pipe is None else Workbench.around(pipe, space)
        return bench.export(self, format, path)

    def generate(self, pipe, prompt: str | None = None, *, space=None, **settings) -> list:
        """Images of `prompt` (default: the space's trigger prompt) with the model fused into the pipeline's UNet,
        one per seed: `pipeline.generate(pipe, space, model, prompt, seeds=..., num_inference_steps=...)`."""
        from .pipeline import generate

        return generate(pipe, self.known_space(space), self, prompt, **settings)

    def load_into(self, pipe, adapter_name: str | None = None, *, space=None) -> None:
        """Load the model into a diffusers pipeline as a LoRA adapter, its PEFT export (`save_lora`) read by
        diffusers' `load_lora_weights`: `pipe(prompt)` then draws the identity and `pipe.unload_lora_weights()`
        removes it. diffusers' notice that the LoRA holds no text-encoder weights, expected of a w2w LoRA, is
        not shown."""
        from .pipeline import quiet_text_encoder_notice

        with tempfile.TemporaryDirectory(prefix="w2w-lora-") as folder:
            lora = self.save_lora(Path(folder) / "lora", space=space, pipe=pipe)  # the layout checked against it
            with quiet_text_encoder_notice():
                pipe.load_lora_weights(str(lora), adapter_name=adapter_name)

    def __repr__(self) -> str:
        made = f", made_by={self.made_by!r}" if self.provenance else ""
        return f"W2WModel(space={self.space_id or '?'}, K={len(self.coefficients):,}{made})"
