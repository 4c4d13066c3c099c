"""Dreambooth LoRA for one identity, with the interface of the original w2w `train_dreambooth.py`.

    accelerate launch train_dreambooth.py --instance_data_dir data/faces/celeba_generated/000000 \
        --output_dir loras/000000 --max_train_steps 800        # the tiny world (default base)

Writes `<output_dir>/unet/adapter_model.safetensors` + `adapter_config.json`, the format of the
released models. The LoRA is a PEFT adapter (`LoraConfig` + `unet.add_adapter`). Class images are
generated once into --class_data_dir and reused. `w2w train-identities` trains many identities in
one pass and gives the same weights for each.
"""
from __future__ import annotations

import argparse
import sys

from lora_w2w.dreambooth import DreamboothConfig, add_dreambooth_arguments, train_one
from lora_w2w.errors import W2WError, exit_code
from lora_w2w.flags import OneSpellingFormatter, config_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=OneSpellingFormatter)
    parser.add_argument("--instance_data_dir", required=True, help="folder of the identity's images")
    parser.add_argument("--output_dir", required=True, help="where <output_dir>/unet/ is written")
    add_dreambooth_arguments(parser, kebab=False)
    args = parser.parse_args(argv)
    try:
        config_from_args(DreamboothConfig, args, kebab=False)  # the recipe's checks, naming the flags
    except W2WError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code("train_dreambooth.py", lambda: train_one(args))


if __name__ == "__main__":
    sys.exit(main())
