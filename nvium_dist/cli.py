"""Argument types the command-line tools share: a bad value is argparse's one-line usage error, not a
traceback (or a silent misbehaviour) later on. Importing this costs nothing (`--help` stays fast)."""
from __future__ import annotations

import argparse
import math
import os
import warnings


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


def parse_int_list(text: str) -> list[int]:
    """"1, 4,16" -> [1, 4, 16] (empty items are skipped); ValueError says what was wrong with the text."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None


def int_list(minimum: int):
    """argparse type: a non-empty comma-separated list of integers, each >= `minimum`."""
    def parse(text: str) -> list[int]:
        try:
            values = parse_int_list(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"must be integers >= {minimum}, got {text!r}")
        return values
    return parse


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = float_above(0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


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


def quiet_training_noise(device: str) -> None:
    """Silences what a training process prints that no user can act on: DeepSpeed's warning (once per rank)
    that it fell back to its CPU accelerator, and torch's deprecation of the all_gather_into_tensor that
    DeepSpeed's ZeRO calls. Call before DeepSpeed is imported."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would detect, said up front
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


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
