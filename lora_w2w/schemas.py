"""JSON schemas of every JSON the project reads, checked once where the file is read.

    check(value, SPACE_DESCRIPTION, path)   # FileFormatError "space.json: layout.alpha is nan; expected ..."

The schemas are JSON Schema (draft 2020-12, checked by `jsonschema`) with one added keyword,
`finite`: a number that is not NaN or infinite (Python's json reads NaN and Infinity). Every node
that a user can get wrong carries a `description` of what is expected; the error names the file,
the key (`shards[2].file`) and that description.
"""
from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match

from .errors import FileFormatError
from .paths import check_input

_short = reprlib.Repr()  # values in messages, cut to a line
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 4


def _finite(validator, wanted, instance, schema):
    if wanted and isinstance(instance, float) and not math.isfinite(instance):
        yield ValidationError(f"{instance} is not a finite number")


_Validator = validators.extend(Draft202012Validator, {"finite": _finite})


def _key(path) -> str:
    """('shards', 2, 'file') -> 'shards[2].file'."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _message(error: ValidationError) -> str:
    """One line: the key, the value found and what was expected."""
    key = _key(error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        expected = error.schema.get("properties", {}).get(missing, {}).get("description")
        where = f"{key}: " if key else ""
        return f"{where}missing key {missing!r}" + (f" ({expected})" if expected else "")
    if error.validator == "additionalProperties" and error.validator_value is False:
        return f"{key or 'the top level'}: {error.message}"
    described = error  # an error inside anyOf is described by the anyOf
    while described is not None and "description" not in described.schema:
        described = described.parent
    expected = error.message if described is None else described.schema["description"]
    return f"{key or 'the top level'} is {_short.repr(error.instance)}; expected {expected}"


def check(value, schema: dict, path: str | Path) -> None:
    """Raise FileFormatError naming `path`, the key and what was expected when `value` does not fit `schema`."""
    error = best_match(_Validator(schema).iter_errors(value))
    if error is not None:
        raise FileFormatError(f"{path}: {_message(error)}")


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's (key, value) pairs as a dict; ValueError when a key comes twice (json.loads would
    keep the last silently, where another reader may take the first)."""
    value = {}
    for key, item in pairs:
        if key in value:
            raise ValueError(f"the key {key!r} comes twice in one object")
        value[key] = item
    return value


def read_json(path: Path, schema: dict | None = None):
    """The parsed JSON file `path`, checked against `schema`; FileFormatError naming it when it is not JSON,
    names a key twice in an object, or is a FIFO, socket or device."""
    check_input(path, "a JSON file")
    try:
        value = json.loads(path.read_bytes(), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FileFormatError(f"{path}: invalid JSON ({error})") from None
    if schema is not None:
        check(value, schema, path)
    return value


# ----------------------------------------------------------------------------- building blocks

def integer(minimum: int = 0) -> dict:
    return {"type": "integer", "minimum": minimum, "description": f"an integer >= {minimum}"}


def text(what: str = "a string") -> dict:
    return {"type": "string", "description": what}


POSITIVE = {"type": "number", "finite": True, "exclusiveMinimum": 0, "description": "a finite number > 0"}
NON_NEGATIVE = {"type": "number", "finite": True, "minimum": 0, "description": "a finite number >= 0"}

LAYOUT = {
    "type": "object", "description": "a LoRA layout: {rank, alpha, target_modules, layers}",
    "required": ["rank", "alpha", "target_modules", "layers"],
    "properties": {
        "rank": integer(1),
        "alpha": POSITIVE,
        "target_modules": {"type": "array", "items": text("a module name such as 'to_q'"), "minItems": 1,
                           "description": "a list of module names such as ['to_q', 'to_v']"},
        "layers": {"type": "array", "minItems": 1, "description": "a list of [module name, in_features, out_features]",
                   "items": {"type": "array", "prefixItems": [text("a module name"), integer(1), integer(1)],
                             "minItems": 3, "maxItems": 3,
                             "description": "[module name, in_features, out_features]"}},
    },
}


def description_schema(fmt: str, required: list[str], properties: dict) -> dict:
    """A project folder's description file of format `fmt` (space.json, index.json)."""
    return {"type": "object", "description": f"a JSON object (a {fmt} description)",
            "required": ["format", "version", *required],
            "properties": {"format": {"const": fmt, "description": repr(fmt)}, "version": integer(1), **properties}}


INVERSION_SETTINGS = {
    "type": "object", "additionalProperties": False,
    "description": "inversion settings such as {\"lr\": 0.1}",
    "properties": {"components": integer(1), "steps": integer(1), "checkpoint_every": integer(1),
                   "lr": POSITIVE, "weight_decay": NON_NEGATIVE},
}

SPACE_DESCRIPTION = description_schema("w2w-space", ["id", "layout", "num_weights", "num_components", "num_models"], {
    "id": {"type": "string", "minLength": 1, "description": "the space id, a non-empty string"},
    "base_model": text("the base model id, a string"),
    "prompt": text("the trigger prompt, a string"),
    "num_weights": integer(1),
    "num_components": integer(1),
    "num_models": integer(0),
    "layout": LAYOUT,
    "inversion_presets": {"type": "object", "additionalProperties": INVERSION_SETTINGS,
                          "description": "preset names mapped to settings, such as {\"ood\": {\"lr\": 0.1}}"},
})

SHARD_FILE = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\\x00]+$",
              "description": "a plain file name inside the dataset folder (no '/', no '..')"}


def dataset_index(dtypes: list[str]) -> dict:
    """index.json of a weights dataset whose shards may be of `dtypes`."""
    return description_schema("w2w-weights", ["layout", "names", "shards", "shard_size"], {
        "num_weights": integer(1),
        "shard_size": integer(1),
        "dtype": {"enum": dtypes, "description": f"one of {', '.join(dtypes)}"},
        "base_model": text("the base model id, a string"),
        "layout": LAYOUT,
        "names": {"type": "array", "items": text("a model name, a string"), "description": "a list of model names"},
        "shards": {"type": "array", "description": "a list of shards {file, rows}",
                   "items": {"type": "object", "required": ["file", "rows"], "description": "a shard {file, rows}",
                             "properties": {"file": SHARD_FILE, "rows": integer(1)}}},
    })


ADAPTER_CONFIG = {
    "type": "object", "description": "a JSON object (PEFT's LoraConfig)",
    "properties": {
        "r": integer(1),
        "lora_alpha": POSITIVE,
        "target_modules": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"},
                                     {"type": "null"}],
                           "description": "a list of module names, a regular expression or null"},
        "base_model_name_or_path": {"type": ["string", "null"], "description": "a model id, a string or null"},
        "use_rslora": {"type": "boolean", "description": "true or false"},
        "alpha_pattern": {"type": "object", "additionalProperties": POSITIVE,
                          "description": "an object: module name pattern -> alpha, a finite number > 0"},
        "rank_pattern": {"type": "object", "additionalProperties": integer(1),
                         "description": "an object: module name pattern -> rank, an integer >= 1"},
    },
}

SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                        "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a LoRA's weights may be stored as

SAFETENSORS_HEADER = {
    "type": "object", "description": "a JSON object: tensor name -> {dtype, shape, data_offsets}",
    "properties": {"__metadata__": {"type": "object", "additionalProperties": text("a string"),
                                    "description": "an object of string values"}},
    "additionalProperties": {
        "type": "object", "required": ["dtype", "shape", "data_offsets"],
        "description": "a tensor entry {dtype, shape, data_offsets}",
        "properties": {
            "dtype": {"enum": list(SAFETENSORS_ITEMSIZE), "description": f"one of {', '.join(SAFETENSORS_ITEMSIZE)}"},
            "shape": {"type": "array", "items": integer(0), "description": "a list of integers >= 0"},
            "data_offsets": {"type": "array", "items": integer(0), "minItems": 2, "maxItems": 2,
                             "description": "[begin, end], two integers >= 0"}},
    },
}
