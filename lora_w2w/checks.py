"""The limits of the numbers and choices that commands take, in one place. Each `check_*` returns the
value or raises ArgumentError naming it and what was expected; the library functions call them, and
`argument` turns them into argparse types, so that the CLI refuses a bad value before any model loads.

    parser.add_argument("--steps", type=argument(check_int, minimum=1))
    parser.add_argument("--device", type=argument(resolve_device, parse=str), default="auto")
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Callable

from .errors import ArgumentError, W2WError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit number
SIZE_STEP = 8         # the VAE scales images by 8: sizes are multiples of 8
DEVICE_TYPES = ("cpu", "cuda", "mps")
# Adam and AdamW move each parameter by about the learning rate a step: at LEARNING_RATE_MAX one step carries
# a coefficient past the typical norm of any space's models (at most sqrt(10^8), see space.COEFFICIENT_MAX)
# and a LoRA weight (of order 0.01) a million times past its size; torch cannot use a rate beyond float32's
# largest number (3.4e38) at all.
LEARNING_RATE_MAX = 1e4
# Weight decay pulls each parameter towards 0 by lr x decay of itself a step (AdamW), or adds decay x the
# parameter to its gradient (Adam's L2 penalty); beyond WEIGHT_DECAY_MAX the pull swamps any loss.
WEIGHT_DECAY_MAX = 1e4
# Subspace iteration shrinks the error of the components by (sigma_(L+1) / sigma_K)^2 a pass: after
# POWER_ITERATIONS_MAX passes even a spectral gap of 10% has shrunk it by 0.9^200 = 7e-10, below float32's
# rounding; a flatter spectrum is the exact method's case (--method exact). Each pass reads the whole dataset.
POWER_ITERATIONS_MAX = 100
MEMORY_MAX = 2**50  # bytes: more than any machine or dask worker has (1 PiB); larger is a typo


def _named(what: str, text: str) -> str:
    return f"{what}: {text}" if what else text


def check_int(value, what: str = "", minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in minimum .. maximum (None: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, int) and not (hasattr(value, "__index__")):
        raise ArgumentError(_named(what, f"expected an integer, got {value!r}"))
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"from {minimum} to {maximum}" if minimum is not None and maximum is not None else
                  f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ArgumentError(_named(what, f"expected an integer {bounds}, got {value}"))
    return value


def check_seed(value, what: str = "seed") -> int:
    """A random seed: 0 .. 2^63 - 1."""
    return check_int(value, what, 0, SEED_MAX)


def check_size(value, what: str = "size") -> int:
    """An image size in pixels: a positive multiple of 8."""
    value = check_int(value, what, SIZE_STEP)
    if value % SIZE_STEP:
        below = value - value % SIZE_STEP
        raise ArgumentError(_named(what, f"expected a multiple of {SIZE_STEP} pixels, got {value} "
                                         f"(try {below} or {below + SIZE_STEP})"))
    return value


def check_number(value, what: str = "", minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None, why: str = "") -> float:
    """`value` as a finite float, >= `minimum`, > `above` and <= `maximum` when given; `why` says the
    reason of the maximum in its message."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # an int beyond float's range overflows
        raise ArgumentError(_named(what, f"expected a number, got {value!r}")) from None
    if not math.isfinite(number):
        raise ArgumentError(_named(what, f"expected a finite number, got {value!r}"))
    if minimum is not None and number < minimum:
        raise ArgumentError(_named(what, f"expected a number >= {minimum:g}, got {number:g}"))
    if above is not None and number <= above:
        raise ArgumentError(_named(what, f"expected a number > {above:g}, got {number:g}"))
    if maximum is not None and number > maximum:
        reason = f": {why}" if why else ""
        raise ArgumentError(_named(what, f"expected a number <= {maximum:g}, got {number:g}{reason}"))
    return number


def check_learning_rate(value, what: str = "learning rate") -> float:
    """A learning rate: > 0 and at most LEARNING_RATE_MAX."""
    return check_number(value, what, above=0.0, maximum=LEARNING_RATE_MAX,
                        why="Adam moves each parameter by about the learning rate a step")


def check_weight_decay(value, what: str = "weight decay") -> float:
    """A weight decay: >= 0 and at most WEIGHT_DECAY_MAX."""
    return check_number(value, what, minimum=0.0, maximum=WEIGHT_DECAY_MAX,
                        why="the decay would swamp the loss")


def check_power_iterations(value, what: str = "power iterations") -> int:
    """Passes of subspace iteration: 0 .. POWER_ITERATIONS_MAX (the reason in the message)."""
    value = check_int(value, what, minimum=0)
    if value > POWER_ITERATIONS_MAX:
        raise ArgumentError(_named(what, f"expected at most {POWER_ITERATIONS_MAX}, got {value}: each is a pass over "
                                         f"the whole dataset, and {POWER_ITERATIONS_MAX} make even a 10% spectral "
                                         f"gap converge below float32's rounding (a flatter spectrum: --method exact)"))
    return value


def parse_memory(text: str | int) -> int:
    """'4GB', '512MB', '8GiB', '2e9' or a number of bytes -> bytes (GB = 10⁹, GiB = 2³⁰), from 1 to MEMORY_MAX."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(min(text, 2 * MEMORY_MAX))
    else:
        match = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
        try:
            unit = (match.group(2) or "").lower()
            value = float(match.group(1)) * ((1024 if unit.endswith("i") else 1000) ** " kmgt".index(unit[:1] or " "))
        except (AttributeError, ValueError, KeyError):
            raise ArgumentError(f"memory {text!r}: expected a size such as 4GB, 512MB or 8GiB") from None
    if not 1 <= value <= MEMORY_MAX:  # 1e400 is inf
        raise ArgumentError(f"memory {text!r}: expected a size from 1 byte up to {MEMORY_MAX / 2**50:g} PiB (no "
                            f"machine has more)")
    return int(value)


def resolve_device(device="auto"):
    """A torch.device this machine has: 'auto' -> CUDA when present, else Apple's MPS when present, else
    the CPU; 'cuda', 'cuda:1', 'mps', 'cpu' checked against what torch finds."""
    import torch

    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise ArgumentError(f"device {str(device)!r}: expected auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ArgumentError(f"device {str(device)!r}: {why}; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ArgumentError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 .. "
                                f"cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError(f"device {str(device)!r}: Apple's MPS is not available here; use --device cpu (or auto)")
    return resolved


def available_memory(device) -> int:
    """Bytes free for new tensors on `device` (a torch.device): the GPU's free memory, or the memory
    the operating system reports available."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gigabytes(size: float) -> str:
    return f"{size / 2**30:.1f} GB"


def argument(check: Callable, parse: Callable = int, **limits) -> Callable[[str], object]:
    """An argparse type: the text parsed by `parse`, then `check(value, **limits)`."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if parse is int else 'a number'}, got {text!r}") from None
        try:
            return check(value, **limits)
        except W2WError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = check.__name__
    return convert


def check_memory_text(text: str) -> str:
    """A memory size as typed ('4GB'), kept as typed once `parse_memory` reads it."""
    parse_memory(text)
    return text


SEED = argument(check_seed, what="")
COUNT = argument(check_int, minimum=1)         # steps, models, components, shard sizes ...
NON_NEGATIVE = argument(check_int, minimum=0)  # oversamples, timesteps
POWER_ITERATIONS = argument(check_power_iterations, what="")
LEARNING_RATE = argument(check_learning_rate, parse=float, what="")
WEIGHT_DECAY = argument(check_weight_decay, parse=float, what="")
SIZE = argument(check_size, what="")
FINITE = argument(check_number, parse=float)
POSITIVE = argument(check_number, parse=float, above=0.0)
DEVICE = argument(resolve_device, parse=str)
MEMORY = argument(check_memory_text, parse=str)
