"""lm-evaluation-harness model type `nvium`: scores and samples the N-vium mixture of an export.

    lm_eval --model nvium --model_args export=exports/tiny --tasks hellaswag        # after scripts/setup.sh
    python -m nvium_dist.evaluation.lm_eval_model --model nvium --model_args export=exports/tiny --tasks ...
    python tools/evaluate.py --model exports/tiny --lm-eval hellaswag,arc_easy

* loglikelihood / loglikelihood_rolling: log p_mix of the continuation tokens (every head on every token,
  mixed by the routers through nvium_dist.mixture), batched with right padding; `is_greedy` compares each
  continuation token with the argmax of p_mix.
* generate_until: nvium's exact sampler (deferred decoding: each token is an ancestral sample of p_mix that
  runs only the layers up to its sampled exit) when the request samples at temperature 1 without top-k/top-p;
  greedy (do_sample false or temperature 0, lm-eval's usual setting) and transformed sampling run every head
  (mode="full") and transform p_mix itself. Generation stops at the tokenizer's end-of-sequence token or at
  max_gen_toks; the text is cut at the first `until` string.

Model arguments: export=DIR (required), batch_size (default 8), device (cpu|cuda), max_length (default the
model's seq_length), seed (default 1234; sampling randomness is keyed by seed, request index and position).
"""
from __future__ import annotations

import os
import warnings

import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry imports them only while empty
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from nvium_dist.checkpoint_io import CheckpointError


DEFAULT_BATCH_SIZE = 8


def _batch_size(value) -> int:
    if value in (None, "auto") or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value}")
    return size


class NviumLM(TemplateLM):
    def __init__(self, export: str | None = None, batch_size=DEFAULT_BATCH_SIZE, device: str | None = None,
                 max_length: int | None = None, seed: int = 1234, max_batch_size=None):
        super().__init__()
        from nvium_dist.inference import NviumGenerator

        if not export:
            raise ValueError("the nvium model needs --model_args export=EXPORT_DIR")
        device = "cuda" if device and str(device).startswith("cuda") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():  # lm_eval's command line defaults to cuda
            warnings.warn("device cuda requested but no CUDA device is visible; evaluating on the CPU")
            device = "cpu"
        try:
            self.generator = NviumGenerator.from_pretrained(export, device=device)
        except CheckpointError as err:
            # lm-eval's command line prints a traceback for any exception of a model's constructor; its
            # message is the whole answer (tools/evaluate.py checks the export before it gets here)
            raise SystemExit(f"error: nvium: {err}") from None
        if self.generator.tokenizer.kind == "none":
            raise ValueError(f"{export} has no tokenizer; lm-eval needs text in and out (export with a tokenizer)")
        self.export = str(export)
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or self.generator.config.seq_length)
        if not 1 < self.max_length <= self.generator.config.seq_length:
            raise ValueError(f"max_length {self.max_length} must be in 2..{self.generator.config.seq_length} "
                             "(the model's seq_length)")
        self.seed = int(seed)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "NviumLM":
        """--model_args win over lm-eval's own --batch_size/--device (lm-eval passes both: batch_size given twice
        would be Python's "got multiple values for keyword argument")."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "NviumLM":
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    # -- tokenizer ---------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The end-of-document id nvium trains with (SentencePiece eos); a byte-level export uses byte 0."""
        eos = self.generator.tokenizer.eos_id
        return eos if eos is not None else 0

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.generator.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.generator.tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return f"nvium:{self.export}"

    def get_model_info(self) -> dict:
        c = self.generator.config
        return {"model_export": self.export, "exits": list(c.exits), "num_layers": c.num_layers,
                "hidden_size": c.hidden_size}

    # -- scoring ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _mixture_at(self, tokens: torch.Tensor, positions: list[list[int]]) -> list[torch.Tensor]:
        """log p_mix [n_i, V] after the given positions of each row (one full-depth forward of the batch)."""
        rows = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)])
        cols = torch.tensor([i for p in positions for i in p], dtype=torch.long)
        mixed = self.generator.mixture_logprobs(tokens, at=(rows, cols)).cpu()
        return list(mixed.split([len(p) for p in positions]))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p_mix of the continuation, every token the argmax)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        windows = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                results[i] = (0.0, True)
                continue
            # the last max_length + 1 tokens: the input is all but the last, the continuation is predicted
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            windows.append((i, whole[:-1], list(continuation)[-(len(whole) - 1):]))
        windows.sort(key=lambda w: -len(w[1]))  # similar lengths together: less padding
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            width = len(chunk[0][1])
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            positions = []
            for row, (_, inputs, target) in enumerate(chunk):
                tokens[row, :len(inputs)] = torch.tensor(inputs)  # right padding: causal rows ignore it
                positions.append(list(range(len(inputs) - len(target), len(inputs))))
            for (i, _, target), log_mix in zip(chunk, self._mixture_at(tokens, positions)):
                target_ids = torch.tensor(target)
                logprob = log_mix.gather(-1, target_ids[:, None]).sum().item()
                greedy = bool((log_mix.argmax(-1) == target_ids).all())
                results[i] = (logprob, greedy)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(logprob for logprob, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation -------------------------------------------------------------------------------------

    def _sampling(self, gen_kwargs: dict) -> dict:
        """lm-eval's generation settings -> NviumGenerator.generate arguments."""
        temperature = float(gen_kwargs.get("temperature", 1.0 if gen_kwargs.get("do_sample") else 0.0))
        if not gen_kwargs.get("do_sample", temperature > 0) or temperature == 0:
            return {"mode": "full", "greedy": True}
        top_k, top_p = int(gen_kwargs.get("top_k") or 0), float(gen_kwargs.get("top_p") or 1.0)
        if temperature == 1.0 and top_k == 0 and top_p >= 1.0:
            return {"mode": "deferred"}  # exact ancestral sampling of p_mix
        return {"mode": "full", "temperature": temperature, "top_k": top_k, "top_p": top_p}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            max_new = max(1, min(max_new, self.max_length - 1))
            sampling = self._sampling(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                    prompts.append(ids[-(self.max_length - max_new):])
                result = self.generator.generate(prompts, max_new, seed=self.seed, sequence_ids=chunk,
                                                 eos_id=self.generator.tokenizer.eos_id, **sampling)
                for i, tokens in zip(chunk, result.tokens):
                    text = self.tok_decode([t for t in tokens if t != self.generator.tokenizer.eos_id])
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


if "nvium" not in model_registry:  # the site hook (lm_eval_hook) may have registered it lazily already
    model_registry.register("nvium")(NviumLM)


def main() -> None:
    """`lm_eval`'s own command line with the `nvium` model registered (no .pth hook needed)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
