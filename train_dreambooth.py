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

from lora_w2w.dreambooth import add_dreambooth_arguments, check_dreambooth_arguments, train_one
from lora_w2w.errors import W2WError
from lora_w2w.flags import OneSpellingFormatter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=OneSpellingFormatter)
    parser.add_argument("--instance_data_dir", required=True, help="folder of the identity's images")
    parser.add_argument("--output_dir", required=True, help="where <output_dir>/unet/ is written")
    add_dreambooth_arguments(parser, kebab=False)
    args = parser.parse_args(argv)
    try:
        check_dreambooth_arguments(args, kebab=False)
    except W2WError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_one(args)
    except W2WError as error:
        print(f"train_dreambooth.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the class images made are kept; the adapter is written whole or not at all
        print("train_dreambooth.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
