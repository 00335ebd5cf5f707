"""Argument types the command-line tools share: a bad value is argparse's one-line usage error, not a
traceback (or a silent misbehaviour) later on. Importing this costs nothing (`--help` stays fast)."""
from __future__ import annotations

import argparse
import math
import os


def _at_least(kind, minimum, what: str, strict: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value
    return parse


def int_at_least(minimum: int):
    """argparse type: an integer >= `minimum`."""
    return _at_least(int, minimum, "an integer")


def float_at_least(minimum: float):
    """argparse type: a finite number >= `minimum`."""
    return _at_least(float, minimum, "a number")


def float_above(minimum: float):
    """argparse type: a finite number > `minimum`."""
    return _at_least(float, minimum, "a number", strict=True)


def file_prefix(text: str) -> str:
    """argparse type: an output prefix (PREFIX.bin, PREFIX.model, ...) that ends in a name, not in a directory."""
    if not os.path.basename(text):
        raise argparse.ArgumentTypeError(f"{text!r} ends in a directory; add a file name prefix, e.g. {text}corpus")
    return text


def torch_setup_error(device: str, threads: int = 0) -> str | None:
    """The error line for `--device cuda` on a machine without CUDA, else None after setting torch's CPU
    thread count (`threads` 0: torch's default)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "error: --device cuda but no CUDA device is visible; use --device cpu"
    if threads:
        torch.set_num_threads(threads)
    return None


def load_generator(export: str, device: str, threads: int = 0):
    """-> (NviumGenerator, None), or (None, the error line) for a bad --device or export. threads 0: one thread
    for a CPU model narrower than 1024 (small-batch decoding: thread barriers cost more than they give), else
    torch's default."""
    import torch

    from nvium_dist.checkpoint_io import CheckpointError
    from nvium_dist.inference import GenerationError, NviumGenerator

    error = torch_setup_error(device, threads)
    if error:
        return None, error
    try:
        generator = NviumGenerator.from_pretrained(export, device=device)
    except (GenerationError, CheckpointError) as err:
        return None, f"error: {err}"
    if not threads and device == "cpu" and generator.config.hidden_size < 1024:
        torch.set_num_threads(1)
    return generator, None
