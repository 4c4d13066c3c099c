"""`w2w info`: say what a file or folder is, and how it was made, without loading more than its headers."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .dataset import INDEX_JSON, WeightsDataset, layout_of_lora
from .errors import FileFormatError, LayoutError
from .formats import KOHYA_PREFIXES, MODEL_CARD, PEFT_WEIGHT_FILES, find_peft_weights, peft_weights_file
from .layout import DEFAULT_RANK, DEFAULT_TARGET_MODULES, REFERENCE_NETWORKS, LoraLayout, reference_layout
from .paths import check_input
from .provenance import INFOTEXT_KEY, MODEL_ID_KEY, SPACE_ID_KEY, parse_infotext, recorded, step_details
from .storage import (ATTRIBUTES_CSV, MODEL_FORMAT, SPACE_JSON, load_model, read_attribute_table,
                      read_safetensors_header, read_space_files)


def _count(n: int, noun: str) -> str:
    """'1 model', '1,000 models'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _layout_lines(layout: LoraLayout) -> list[str]:
    return [f"  LoRA layers  {len(layout)} ({', '.join(layout.target_modules)}), rank {layout.rank}, "
            f"alpha {layout.alpha:g}",
            f"  N            {layout.numel:,} numbers per model"]


def describe_space(directory: Path) -> str:
    description, _, _ = read_space_files(directory)
    layout = LoraLayout.from_dict(description["layout"])
    lines = [f"w2w space {directory}",
             f"  id           {description['id']}",
             f"  base model   {description.get('base_model') or '(not recorded)'}",
             f"  prompt       {description.get('prompt')!r}",
             *_layout_lines(layout),
             f"  K            {_count(description['num_components'], 'component')}",
             f"  M            {_count(description['num_models'], 'dataset model')}"]
    presets = description.get("inversion_presets") or {}
    if presets:  # the settings `w2w invert --preset NAME` takes from this space instead of the paper's
        shown = (f"{name}: " + ", ".join(f"{key} {value}" for key, value in settings.items())
                 for name, settings in presets.items())
        lines.append(f"  inversion    {'; '.join(shown)}")
    if (directory / ATTRIBUTES_CSV).is_file():
        columns = [str(c) for c in read_attribute_table(directory / ATTRIBUTES_CSV).columns]
        lines.append(f"  attributes   {len(columns)}: {', '.join(columns)}")
    return "\n".join(lines)


def describe_dataset(directory: Path) -> str:
    dataset = WeightsDataset(directory)
    return "\n".join([f"w2w weights dataset {directory}",
                      f"  base model   {dataset.base_model or '(not recorded)'}",
                      *_layout_lines(dataset.layout),
                      f"  M            {_count(len(dataset), 'model')} ({dataset.names[0]} .. {dataset.names[-1]})",
                      f"  shards       {len(dataset.shards)} of up to {_count(dataset.shard_size, 'model')}, "
                      f"{dataset.dtype_name}"])


def _made_lines(steps, metadata: dict[str, str] | None = None) -> list[str]:
    """How a model was made, a step a line; the space and model a LoRA was made from."""
    metadata = metadata or {}
    lines = [f"  {label:<12} {metadata[key]}" for label, key in (("space id", SPACE_ID_KEY), ("model id", MODEL_ID_KEY))
             if key in metadata]
    return lines + [f"  {'made by' if i == 0 else '':<12} {step_details(step)}" for i, step in enumerate(steps)]


def _model_card_lines(folder: Path) -> list[str]:
    """What a PEFT folder's model card (README.md) says, as huggingface_hub reads it: base model, trigger phrase."""
    if not (folder / MODEL_CARD).is_file():
        return []
    from huggingface_hub import ModelCard

    data = ModelCard.load(folder / MODEL_CARD).data
    return [f"  model card   {MODEL_CARD}: base model {data.base_model or '(a local folder)'}, trigger phrase "
            f"{data.get('instance_prompt')!r}"]


def describe_peft(path: Path, trust_pickle: bool = False) -> str:
    """A PEFT/diffusers LoRA folder or file: its layout from the tensor shapes, alpha and base model from
    adapter_config.json when there is one, its model card, and how it was made."""
    layout, base_model = layout_of_lora(path, trust_pickle)
    weights = peft_weights_file(path)
    metadata = {} if weights.suffix == ".bin" else read_safetensors_header(weights)[0].get("__metadata__", {})
    return "\n".join([f"PEFT/diffusers LoRA {weights}", *_layout_lines(layout),
                      *([f"  base model   {base_model}"] if base_model else []), *_model_card_lines(weights.parent),
                      *_made_lines(recorded(metadata, str(weights)), metadata)])


KOHYA_SHOWN = (("title", "modelspec.title"), ("base model", "ss_sd_model_name"),  # label, metadata key
               ("trigger", "modelspec.trigger_phrase"), ("resolution", "modelspec.resolution"),
               ("date", "modelspec.date"), ("architecture", "modelspec.architecture"))


def describe_kohya(path: Path, header: dict) -> str:
    """A kohya LoRA file: its layers and rank, and what its ModelSpec and kohya keys say."""
    metadata = header.get("__metadata__", {})
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    layers = {k.split(".")[0] for k in shapes}
    down = [v for k, v in shapes.items() if k.endswith("lora_down.weight")]
    rank = down[0][0] if down else "?"
    return "\n".join([f"kohya LoRA {path}", f"  LoRA layers  {len(layers)}, rank {rank}, "
                                            f"alpha {metadata.get('ss_network_alpha', '?')}",
                      *(f"  {label:<12} {metadata[key]}" for label, key in KOHYA_SHOWN if key in metadata),
                      *_made_lines(recorded(metadata, str(path)), metadata)])


def describe_image(path: Path) -> str | None:
    """A PNG's generation parameters (A1111's `parameters` text chunk, as generate writes it), or None for a file
    that is no image."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(INFOTEXT_KEY)
            size, kind = image.size, image.format
    except (UnidentifiedImageError, OSError):
        return None
    lines = [f"{kind} image {path}", f"  size         {size[0]} x {size[1]}"]
    if text is None:
        return "\n".join(lines + ["  parameters   (none recorded)"])
    prompt, negative, fields = parse_infotext(text)
    lines += [f"  prompt       {prompt!r}"] + ([f"  negative     {negative!r}"] if negative else [])
    return "\n".join(lines + [f"  {key:<12} {value}" for key, value in fields.items()])


def describe_reference(name: str, target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
                       rank: int = DEFAULT_RANK) -> str:
    """The LoRA layout of a full-size network (`layout.REFERENCE_NETWORKS`), built on the meta device: N and
    every layer."""
    layout = reference_layout(name, target_modules, rank)
    what, config = REFERENCE_NETWORKS[name]
    width = max(len(layer.name) for layer in layout.layers)
    return "\n".join([f"{what} (lora_w2w/data/{config}, built on the meta device)", *_layout_lines(layout),
                      "  layers       name, in -> out features",
                      *(f"    {layer.name:<{width}}  {layer.in_features} -> {layer.out_features}"
                        for layer in layout.layers)])


def describe(path: Path, trust_pickle: bool = False) -> str:
    """A few lines describing a space, a weights dataset, a w2w model, a PEFT LoRA folder, a kohya LoRA file or a
    generated image, with how it was made (a PEFT folder's adapter_model.bin pickle is read only with
    `trust_pickle`)."""
    if path.is_dir():
        if (path / SPACE_JSON).is_file():
            return describe_space(path)
        if (path / INDEX_JSON).is_file():
            return describe_dataset(path)
        if find_peft_weights(path) is not None:
            return describe_peft(path, trust_pickle)
        raise FileFormatError(f"{path}: neither a w2w space (no {SPACE_JSON}), a weights dataset (no {INDEX_JSON}) nor a "
                              f"PEFT LoRA folder (none of {', '.join(PEFT_WEIGHT_FILES)})")
    if not check_input(path, "a w2w file or folder").is_file():
        raise FileFormatError(f"{path}: no such file or folder")
    if path.suffix == ".bin":
        return describe_peft(path, trust_pickle)
    if path.suffix == ".pt":
        model = load_model(path, trust_pickle)
        return f"original w2w model {path}\n  K            {_count(len(model.coefficients), 'coefficient')}"
    if path.suffix.lower() != ".safetensors" and (image := describe_image(path)) is not None:
        return image
    header, _ = read_safetensors_header(path)
    metadata = header.get("__metadata__", {})
    if metadata.get("format") == MODEL_FORMAT:
        model = load_model(path)
        return "\n".join([f"w2w model {path}", f"  K            {_count(len(model.coefficients), 'coefficient')}",
                          f"  space id     {model.space_id or '(not recorded)'}", f"  model id     {model.id}",
                          *(_made_lines(model.provenance) or ["  made by      (not recorded)"])])
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    if shapes and all(k.startswith(KOHYA_PREFIXES) for k in shapes):
        return describe_kohya(path, header)
    try:
        return describe_peft(path)
    except LayoutError:
        raise FileFormatError(f"{path}: a safetensors file, but neither a w2w model nor a LoRA") from None
