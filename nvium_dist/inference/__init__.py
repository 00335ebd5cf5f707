"""Exact N-vium decoding: load an export, sample from the mixture (deferred or full depth, batched,
pipeline stages as processes). See nvium_dist.inference.generator."""
from nvium_dist.inference.engine import TickSchedule
from nvium_dist.inference.generator import GenerationError, GenerationOutput, NviumGenerator, Tokenizer
from nvium_dist.inference.sampling import SamplingTransform, uniform

__all__ = ["NviumGenerator", "GenerationOutput", "GenerationError", "Tokenizer", "SamplingTransform", "TickSchedule",
           "uniform"]
