"""Decode benchmark and sample passage for tools/replicate.py, on the nvium_dist.inference API.

The three decoders (dense baseline, N-vium full depth, N-vium deferred) run interleaved inside every
repeat, in a rotating order, so load changes on a shared machine hit all of them alike; best and median
seconds over the repeats are kept. Full and deferred N-vium draw the same tokens for the same seed.
"""
from __future__ import annotations

import random
import statistics


def held_out_prompts(valid_prefix: str, vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` prompts of `length` tokens cut at random places from the held-out split."""
    import numpy as np

    from nvium_dist.data.indexed import open_indexed_dataset

    dataset = open_indexed_dataset(valid_prefix, vocab_size)
    tokens = np.concatenate([np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))])
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(tokens) - length) for _ in range(batch)]
    return [tokens[s:s + length].tolist() for s in starts]


def bench_decode(nvium_dir: str, dense_dir: str, valid_prefix: str, batch_sizes: list[int], new_tokens: int,
                 prompt_tokens: int = 16, repeats: int = 5, seed: int = 0, threads: int = 1, device: str = "cpu",
                 log=print) -> dict:
    import torch

    from nvium_dist.inference import NviumGenerator

    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    nvium = NviumGenerator.from_pretrained(nvium_dir, device=device)
    dense = NviumGenerator.from_pretrained(dense_dir, device=device)
    config = nvium.config
    decoders = {"dense": (dense, "full"), "nvium_full": (nvium, "full"), "nvium_deferred": (nvium, "deferred")}
    result = {"num_layers": config.num_layers, "exit_layers": config.exit_layers, "threads": torch.get_num_threads(),
              "device": device, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "repeats": repeats,
              "batches": []}
    for batch in batch_sizes:
        prompts = held_out_prompts(valid_prefix, config.vocab_size, batch, prompt_tokens, seed + batch)
        for generator, mode in decoders.values():  # warm-up
            generator.generate(prompts, min(8, new_tokens), seed=seed, mode=mode)
        seconds = {name: [] for name in decoders}
        outputs = {}
        names = list(decoders)
        for r in range(repeats):
            order = names[r % 3:] + names[:r % 3]
            for name in order:
                generator, mode = decoders[name]
                sync()
                out = generator.generate(prompts, new_tokens, seed=seed, mode=mode)
                sync()
                seconds[name].append(out.seconds)
                outputs[name] = out
        n = outputs["nvium_full"].num_tokens
        best = {name: n / min(v) for name, v in seconds.items()}
        median = {name: n / statistics.median(v) for name, v in seconds.items()}
        deferred = outputs["nvium_deferred"]
        hist = deferred.exit_histogram()
        mean_layer = deferred.mean_exit_layer()
        entry = {"batch": batch, "tokens_per_s": {k: round(v, 2) for k, v in best.items()},
                 "tokens_per_s_median": {k: round(v, 2) for k, v in median.items()},
                 "seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
                 "speedup_deferred_vs_dense": round(best["nvium_deferred"] / best["dense"], 3),
                 "speedup_deferred_vs_full": round(best["nvium_deferred"] / best["nvium_full"], 3),
                 "speedup_full_vs_dense": round(best["nvium_full"] / best["dense"], 3),
                 "speedup_deferred_vs_dense_median": round(median["nvium_deferred"] / median["dense"], 3),
                 "exit_histogram": hist, "mean_exit_layer": round(mean_layer, 3),
                 "ideal_speedup": round(config.num_layers / mean_layer, 3),
                 "same_tokens_full_deferred": outputs["nvium_full"].tokens == deferred.tokens}
        entry["efficiency_vs_ideal"] = round(entry["speedup_deferred_vs_full"] / entry["ideal_speedup"], 3)
        result["batches"].append(entry)
        log(f"batch {batch}: dense {best['dense']:.1f} tok/s, N-vium full {best['nvium_full']:.1f}, deferred "
            f"{best['nvium_deferred']:.1f} -> {entry['speedup_deferred_vs_dense']:.2f}x dense, "
            f"{entry['speedup_deferred_vs_full']:.2f}x full (ideal {entry['ideal_speedup']:.2f}x); exits {hist}")
    return result


def sample_passage(nvium_dir: str, prompt: str, new_tokens: int, seed: int = 0, device: str = "cpu") -> dict:
    """Exact deferred sampling from the mixture; each token's text piece and the exit it took."""
    from nvium_dist.inference import NviumGenerator

    generator = NviumGenerator.from_pretrained(nvium_dir, device=device)
    tok = generator.tokenizer
    prompt_ids = tok.encode(prompt) if tok.kind != "none" else [1]
    out = generator.generate([prompt_ids], new_tokens, seed=seed, mode="deferred")
    tokens, exits = out.tokens[0], out.exits[0]
    pieces, previous = [], tok.decode(prompt_ids)
    for i in range(len(tokens)):  # decode growing prefixes so SentencePiece spaces land on the right token
        text = tok.decode(prompt_ids + tokens[:i + 1])
        pieces.append(text[len(previous):] if text.startswith(previous) else tok.decode([tokens[i]]))
        previous = text
    return {"prompt": tok.decode(prompt_ids), "tokens": tokens, "exits": exits, "pieces": pieces,
            "exit_layers": generator.config.exit_layers, "exit_histogram": out.exit_histogram(),
            "mean_exit_layer": out.mean_exit_layer(), "seed": seed, "text": tok.decode(prompt_ids + tokens)}
