"""Decoding without host waits: device-side random numbers and fixed-shape (CUDA graph) single-token calls."""
import random
from unittest import mock

import pytest
import torch

from test_inference import full_forward_kv, make_export

PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from nvium_dist.inference import NviumGenerator

    torch.set_num_threads(1)
    return NviumGenerator.from_pretrained(make_export(tmp_path_factory.mktemp("graphs") / "export"))


def test_device_uniforms_equal_the_counter_hash_bitwise():
    from nvium_dist.inference.sampling import uniform, uniform_keys, uniforms

    rng = random.Random(0)
    keys = [(rng.getrandbits(64), rng.randrange(2 ** 40), rng.randrange(1 << 17), rng.randrange(-1, 9),
             rng.randrange(2)) for _ in range(20_000)]
    keys += [(2 ** 64 - 1, 0, 0, -1, 1), (0, 0, 0, 0, 0), (-1, -1, -1, -1, -1), (2 ** 63, 2 ** 63 - 1, 1, 1, 1)]
    assert uniforms(uniform_keys(keys)).tolist() == [uniform(*key) for key in keys]


def _spy_single_token_calls():
    from nvium_dist.inference.graphs import SingleTokenCalls

    return mock.patch.object(SingleTokenCalls, "run", autospec=True, side_effect=SingleTokenCalls.run)


@pytest.mark.parametrize("mode", ["deferred", "full"])
def test_fixed_shape_calls_equal_the_default_calls(generator, mode):
    """Same tokens and exits, per-step logits and KV caches within float rounding, and most segment calls of a
    batch of one take the fixed-shape path."""
    default = generator.generate([PROMPT], 30, seed=7, mode=mode, flush=True, trace=True)
    with _spy_single_token_calls() as spy:
        fixed = generator.generate([PROMPT], 30, seed=7, mode=mode, flush=True, trace=True, fixed_shape_calls=True)
    assert fixed.tokens == default.tokens and fixed.exits == default.exits
    assert len(set(default.exits[0])) > 1  # the routers used several exits
    calls = sum(default.engine.segment_calls)
    assert spy.call_count >= calls // 2, (spy.call_count, calls)
    assert len(fixed.trace) == len(default.trace)
    for (kind, *key, value), (kind_d, *key_d, value_d) in zip(fixed.trace, default.trace):
        assert (kind, key) == (kind_d, key_d)
        torch.testing.assert_close(value, value_d, atol=1e-5, rtol=1e-5)
    sequence = fixed.sequences[0]
    for layer, (keys, values) in full_forward_kv(generator, sequence).items():
        torch.testing.assert_close(fixed.engine.cache.keys[layer][0, :, :len(sequence)], keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(fixed.engine.cache.values[layer][0, :, :len(sequence)], values, atol=1e-5, rtol=0)


def test_fixed_shape_calls_decode_one_sequence(generator):
    from nvium_dist.inference import GenerationError

    with pytest.raises(GenerationError, match="one sequence at a time"):
        generator.generate([PROMPT, PROMPT], 4, fixed_shape_calls=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager_on_gpu(tmp_path):
    from nvium_dist.inference import NviumGenerator

    on_gpu = NviumGenerator.from_pretrained(make_export(tmp_path / "export"), device="cuda")
    eager = on_gpu.generate([PROMPT], 30, seed=7, flush=True)
    with _spy_single_token_calls():
        graphs = on_gpu.generate([PROMPT], 30, seed=7, flush=True, fixed_shape_calls=True)
    assert graphs.tokens == eager.tokens and graphs.exits == eager.exits
    assert graphs.engine.single_token_calls.graphs  # captured
    full = on_gpu.generate([PROMPT], 30, seed=7, mode="full", fixed_shape_calls=True)
    assert full.engine.decide_per_tick and full.tokens == eager.tokens and full.exits == eager.exits
    n = len(graphs.sequences[0])
    for layer, keys in eager.engine.cache.keys.items():
        torch.testing.assert_close(graphs.engine.cache.keys[layer][0, :, :n], keys[0, :, :n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompts", [[PROMPT], [[5, 6, 7], [8, 9, 10, 11, 12], [1], [4, 4, 20]]], ids=["batch1", "batch4"])
def test_full_depth_decisions_per_tick_draw_the_same_tokens(generator, prompts):
    """The GPU's full-depth path (exit decisions kept on the device until the tick's tokens are drawn), run on CPU:
    the same tokens and exits as the exit-by-exit path and as deferred decoding, and the same KV caches."""
    from nvium_dist.inference.driver import Driver
    from nvium_dist.inference.engine import StageEngine

    reference = generator.generate(prompts, 24, seed=9, mode="full", flush=True)
    assert not reference.engine.decide_per_tick  # CPU keeps the exit-by-exit path
    config = generator.config
    with torch.inference_mode():
        engine = StageEngine(generator.model, range(config.num_heads_total), len(prompts), reference.engine.max_len, 9,
                             full_depth=True)
        engine.decide_per_tick = True
        driver = Driver(engine, generator.model, prompts, list(range(len(prompts))), [24] * len(prompts), None, True)
        driver.run(lambda: engine.tick().results)
    assert driver.tokens == reference.tokens and driver.exits == reference.exits
    assert len({e for row in driver.exits for e in row}) > 1
    deferred = generator.generate(prompts, 24, seed=9)
    assert driver.tokens == deferred.tokens
    for layer, keys in reference.engine.cache.keys.items():
        torch.testing.assert_close(engine.cache.keys[layer], keys, atol=1e-6, rtol=0)
