"""Exact deferred decoding: KV equivalence, per-step distributions, statistics, seeds, transforms, bad input."""
import math
from pathlib import Path

import pytest
import torch

from nvium_dist.config import ModelConfig, ParallelConfig

SMALL = dict(vocab_size=61, hidden_size=64, num_layers=6, num_heads=4, ffn_hidden_size=96, exits=[1, 2, 4],
             seq_length=48, make_vocab_size_divisible_by=32)
RAGGED = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [1], [4, 4, 20, 30, 40]]


def make_export(path, seed=0, tokenizer="auto", **overrides):
    """A random model whose heads differ (adapters' W2 perturbed, peaked logits) and whose routers use every exit.
    tokenizer: a SentencePiece .model path, or "auto" (bytes when the vocab has >= 256 entries, else none)."""
    from nvium_dist.checkpoint_io import save_export
    from nvium_dist.model import NviumModel
    from nvium_dist.parallel import init_distributed
    from nvium_dist.tp_layout import gather_full_state_dict

    init_distributed(ParallelConfig())
    config = ModelConfig(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = NviumModel(config)
    with torch.no_grad():
        model.output.weight.mul_(60.0)
        for head in model.heads:
            if head.adapter is not None:
                head.adapter.w2.weight.normal_(std=0.05)  # W1 ~ N(0, 1/sqrt(d)) already spreads the adapter input
            if head.router is not None:
                head.router.logits.weight.mul_(3.0)
    if tokenizer == "auto":
        tokenizer = "bytes" if config.vocab_size >= 256 else None
    save_export(path, config, gather_full_state_dict(model), tokenizer)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP barrier costs (seconds per test on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("inference") / "export")


@pytest.fixture(scope="module")
def generator(export_dir):
    from nvium_dist.inference import NviumGenerator

    return NviumGenerator.from_pretrained(export_dir)


def full_forward_kv(generator, sequence):
    """Keys and values of every layer from one full causal forward pass over `sequence`."""
    recorded = {}

    class Recorder:
        def __init__(self, layer):
            self.layer = layer

        def attend(self, queries, keys, values):
            recorded[self.layer] = (keys[0], values[0])
            return torch.nn.functional.scaled_dot_product_attention(queries, keys, values, is_causal=True)

    model = generator.model
    tokens = torch.tensor([sequence])
    with torch.no_grad():
        hidden, positions = model.embed(tokens), model.default_positions(tokens)
        caches = [Recorder(layer) for layer in range(model.config.num_layers)]
        for k in range(model.config.num_heads_total):
            hidden = model.run_segment(k, hidden, model.rotary(positions), caches)
    return recorded


@pytest.mark.parametrize("prompts", [[[3, 1, 4, 1, 5]], RAGGED], ids=["batch1", "batch4-ragged"])
def test_kv_after_deferred_and_flush_equals_full_forward(generator, prompts):
    out = generator.generate(prompts, 25, seed=7, mode="deferred", flush=True)
    assert sum(1 for row in out.exits for e in row if e < 3) > 0  # some tokens really were deferred
    cache = out.engine.cache
    for row, sequence in enumerate(out.sequences):
        reference = full_forward_kv(generator, sequence)
        n = len(sequence)
        for layer, (keys, values) in reference.items():
            torch.testing.assert_close(cache.keys[layer][row, :, :n], keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.values[layer][row, :, :n], values, atol=1e-5, rtol=0)
    hist = out.exit_histogram()
    print(f"exit histogram {hist}")


def test_decode_layout_keeps_every_weight(export_dir, generator):
    """The generator stores its matrices column-major (W^T contiguous) with the export's shapes and values,
    leaves the embedding as it was, and reads the output matrix as a view (no copy)."""
    from nvium_dist.checkpoint_io import load_export
    from nvium_dist.inference.engine import decode_output_matrix, use_decode_layout

    state = load_export(export_dir).state
    model = generator.model
    for name, param in model.named_parameters():
        want = state[name]
        assert torch.equal(param[:want.shape[0]], want), name  # the export holds no vocab padding rows
        if param.dim() == 2:
            assert param.t().is_contiguous() == (name != "embedding.weight"), name
    use_decode_layout(model)  # idempotent: no copy
    output = decode_output_matrix(model)
    assert output.data_ptr() == model.output.weight.data_ptr() and output.shape == (64, model.config.vocab_size)


def test_every_exit_is_used(generator):
    out = generator.generate(RAGGED, 40, seed=1)
    assert all(count > 0 for count in out.exit_histogram()), out.exit_histogram()


@pytest.mark.parametrize("prompts", [[[3, 1, 4, 1, 5]], RAGGED], ids=["batch1", "batch4-ragged"])
def test_each_step_uses_the_full_forward_state(generator, prompts):
    """The router probabilities at every reached exit and the logits of the head a token was drawn from equal
    those of a full forward pass over the final sequence."""
    from nvium_dist.mixture import router_log_probs

    out = generator.generate(prompts, 20, seed=3, mode="deferred", trace=True)
    references = {}
    for row, sequence in enumerate(out.sequences):
        references[row] = generator.head_outputs(sequence)
    checked = {"router": 0, "logits": 0}
    for kind, row, position, exit, value in out.trace:
        log_heads, routers = references[row]
        if kind == "router":
            got = torch.stack(router_log_probs(value[None]))
            want = torch.stack(router_log_probs(routers[0, position - 1, exit][None]))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(torch.log_softmax(value.float(), -1), log_heads[0, position - 1, exit],
                                       atol=1e-5, rtol=1e-5)
        checked[kind] += 1
    assert checked["logits"] == out.num_tokens and checked["router"] >= out.num_tokens


def test_same_seed_same_tokens_deferred_full_batched(generator):
    deferred = generator.generate(RAGGED, 24, seed=11, mode="deferred")
    full = generator.generate(RAGGED, 24, seed=11, mode="full")
    assert deferred.tokens == full.tokens and deferred.exits == full.exits
    for row, prompt in enumerate(RAGGED):
        single = generator.generate([prompt], 24, seed=11, sequence_ids=[row])
        assert single.tokens[0] == deferred.tokens[row] and single.exits[0] == deferred.exits[row]
    other = generator.generate(RAGGED, 24, seed=12)
    assert other.tokens != deferred.tokens


def test_pipeline_two_stages_same_tokens_and_kv(generator):
    reference = generator.generate(RAGGED, 16, seed=5, mode="deferred", flush=True)
    piped = generator.generate(RAGGED, 16, seed=5, mode="deferred", pipeline_stages=2, flush=True)
    assert piped.tokens == reference.tokens and piped.exits == reference.exits
    for layer, (keys, values) in piped.stage_caches.items():
        torch.testing.assert_close(keys, reference.engine.cache.keys[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(values, reference.engine.cache.values[layer], atol=1e-5, rtol=0)


def test_pipeline_continuous_batching(generator):
    """More prompts than rows through two stage processes: rows are reset on every stage when a new sequence
    enters them, and the tokens equal single-process decoding."""
    reference = generator.generate(PROMPTS7, LIMITS7, seed=6, max_batch=3, schedule=None)  # pipelines tick so
    piped = generator.generate(PROMPTS7, LIMITS7, seed=6, max_batch=3, pipeline_stages=2)
    assert piped.tokens == reference.tokens and piped.exits == reference.exits
    assert piped.rows == reference.rows


@pytest.mark.slow
def test_pipeline_three_stages_full_mode_and_eos(generator):
    eos = generator.generate(RAGGED, 20, seed=4).tokens[1][5]
    for mode in ("deferred", "full"):
        reference = generator.generate(RAGGED, 20, seed=4, mode=mode, eos_id=eos)
        piped = generator.generate(RAGGED, 20, seed=4, mode=mode, eos_id=eos, pipeline_stages=3)
        assert piped.tokens == reference.tokens and piped.exits == reference.exits
    assert len(reference.tokens[1]) == 6


def test_stage_split_is_at_exits_and_balanced():
    from nvium_dist.inference.pipeline import stage_segments

    assert stage_segments(4, [1, 1, 2, 2], 2) == [range(0, 2), range(2, 4)]
    assert stage_segments(4, [2, 2, 2, 2], 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="segments"):
        stage_segments(4, [1, 1, 2, 2], 5)


def _chi_square_p(counts, probs):
    from scipy.stats import chisquare

    n = counts.sum()
    expected = probs * n
    order = torch.argsort(expected, descending=True)
    big = order[expected[order] >= 5]
    small = order[expected[order] < 5]
    obs = torch.cat([counts[big], counts[small].sum().view(1)]) if len(small) else counts[big]
    exp = torch.cat([expected[big], expected[small].sum().view(1)]) if len(small) else expected[big]
    exp = exp * obs.sum() / exp.sum()
    return chisquare(obs.double().numpy(), exp.double().numpy()).pvalue


def test_next_token_statistics_match_p_mix(generator):
    """20,000 independent draws (one per sequence id) of the token after a fixed prefix follow p_mix; the
    same test rejects a sampler that always uses the final head."""
    from nvium_dist.inference.sampling import STREAM_TOKEN, sample_from_logits, uniform

    prefix = [7, 3, 9, 21, 40, 2]
    n = 20_000
    out = generator.generate([prefix] * n, 1, seed=2024, mode="deferred")
    vocab = generator.config.vocab_size
    counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=vocab)
    p_mix = generator.mixture_logprobs(prefix)[-1].exp().double()
    p = _chi_square_p(counts, p_mix)
    hist = out.exit_histogram()
    print(f"chi-square p = {p:.3g}; exits {hist}")
    assert p > 1e-3
    assert min(hist) > 100  # the draw really mixes heads
    # a wrong sampler: always the final head, with the same uniforms
    log_heads, _ = generator.head_outputs(prefix)
    final = log_heads[0, -1, -1].expand(n, vocab)
    u = torch.tensor([uniform(2024, i, len(prefix), 3, STREAM_TOKEN) for i in range(n)], dtype=torch.float64)
    wrong = torch.bincount(sample_from_logits(final, u), minlength=vocab)
    assert _chi_square_p(wrong, p_mix) < 1e-3


def test_mixture_logprobs_match_training_forward(generator):
    tokens = torch.tensor([[5, 9, 33, 2, 7, 7, 1, 60]])
    labels = torch.tensor([[9, 33, 2, 7, 7, 1, 60, 0]])
    log_mix = generator.mixture_logprobs(tokens)
    with torch.no_grad():
        terms = generator.model(tokens, labels)
    torch.testing.assert_close(log_mix.gather(-1, labels[..., None])[..., 0], terms.log_p_mix, atol=1e-5, rtol=0)
    torch.testing.assert_close(log_mix.exp().sum(-1), torch.ones(1, 8), atol=1e-5, rtol=0)


def test_transforms_only_where_exact(generator):
    from nvium_dist.inference import GenerationError

    with pytest.raises(GenerationError, match="mode='full'"):
        generator.generate([[1, 2]], 4, temperature=0.7, mode="deferred")
    with pytest.raises(GenerationError, match="full mixture"):
        generator.generate([[1, 2]], 4, greedy=True)
    greedy = generator.generate([[1, 2, 3]], 6, greedy=True, mode="full")
    seq = [1, 2, 3]
    for token in greedy.tokens[0]:
        assert token == int(generator.mixture_logprobs(seq)[-1].argmax())
        seq.append(token)
    assert greedy.exits[0] == [-1] * 6
    top1 = generator.generate([[1, 2, 3]], 6, top_k=1, mode="full", seed=4)
    assert top1.tokens == greedy.tokens
    sampled = generator.generate([[1, 2, 3]], 6, temperature=0.5, top_p=0.9, mode="full", seed=4)
    assert len(sampled.tokens[0]) == 6


@pytest.mark.parametrize("prompts, max_new, message", [
    ([[]], 4, "prompt 0 is empty"),
    ([list(range(1, 50))], 1, "longer than the model context"),
    ([[1] * 40], 10, "use max_new_tokens <= 8"),
    ([[1, 99]], 2, "outside the vocabulary"),
    ([], 2, "no prompts"),
])
def test_bad_generation_input(generator, prompts, max_new, message):
    from nvium_dist.inference import GenerationError

    with pytest.raises(GenerationError, match=message):
        generator.generate(prompts, max_new)


def test_eos_stops_a_sequence(generator):
    out = generator.generate(RAGGED, 30, seed=9)
    eos = out.tokens[0][3]
    stopped = generator.generate(RAGGED, 30, seed=9, eos_id=eos)
    assert stopped.tokens[0][-1] == eos and len(stopped.tokens[0]) <= 4
    assert stopped.tokens[0] == out.tokens[0][:len(stopped.tokens[0])]


def test_dense_model_decodes(tmp_path):
    from nvium_dist.inference import NviumGenerator

    generator = NviumGenerator.from_pretrained(make_export(tmp_path / "dense", exits=[]))
    deferred = generator.generate(RAGGED, 10, seed=1, flush=True)
    full = generator.generate(RAGGED, 10, seed=1, mode="full")
    assert deferred.tokens == full.tokens and all(e == 0 for row in deferred.exits for e in row)
    assert deferred.mean_exit_layer() == 6
    reference = full_forward_kv(generator, deferred.sequences[1])
    torch.testing.assert_close(deferred.engine.cache.keys[5][1, :, :len(deferred.sequences[1])], reference[5][0],
                               atol=1e-5, rtol=0)


PROMPTS7 = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [1], [4, 4, 20, 30, 40], [2, 3], [9] * 9, [33, 7, 1, 50]]
LIMITS7 = [12, 5, 16, 9, 14, 7, 11]


def test_continuous_batching_matches_each_prompt_alone(generator):
    """7 prompts through 3 rows: a prompt enters a freed row while the others are mid-sequence, and its
    tokens do not depend on the row or the moment (randomness is keyed by the sequence id)."""
    streamed = {}
    out = generator.generate(PROMPTS7, LIMITS7, seed=21, max_batch=3,
                             on_step=lambda tick, sampled: [streamed.setdefault(i, []).append((tick, t, e))
                                                            for i, (t, e) in sampled.items()])
    assert [len(t) for t in out.tokens] == LIMITS7
    assert sorted(set(out.rows)) == [0, 1, 2] and len(out.rows) == 7
    for i, prompt in enumerate(PROMPTS7):
        alone = generator.generate([prompt], LIMITS7[i], seed=21, sequence_ids=[i])
        assert out.tokens[i] == alone.tokens[0] and out.exits[i] == alone.exits[0]
        assert [t for _, t, _ in streamed[i]] == out.tokens[i] and [e for _, _, e in streamed[i]] == out.exits[i]
    # some sequence was admitted while another one, in another row, was still running
    first_tick = {i: ticks[0][0] for i, ticks in streamed.items()}
    last_tick = {i: ticks[-1][0] for i, ticks in streamed.items()}
    assert any(out.rows[a] != out.rows[b] and first_tick[a] < first_tick[b] < last_tick[a] < last_tick[b]
               for a in range(7) for b in range(3, 7))
    full = generator.generate(PROMPTS7, LIMITS7, seed=21, max_batch=3, mode="full")
    assert full.tokens == out.tokens and full.exits == out.exits


def test_continuous_batching_eos_and_flush_kv(generator):
    """EOS frees a row early; with flush=True the last sequence in each row leaves KV equal to a full forward."""
    eos = generator.generate(PROMPTS7, LIMITS7, seed=8, max_batch=2).tokens[3][2]
    out = generator.generate(PROMPTS7, LIMITS7, seed=8, max_batch=2, eos_id=eos, flush=True)
    assert len(out.tokens[3]) <= 3 and out.tokens[3][-1] == eos
    for i, prompt in enumerate(PROMPTS7):
        alone = generator.generate([prompt], LIMITS7[i], seed=8, sequence_ids=[i], eos_id=eos)
        assert out.tokens[i] == alone.tokens[0]
    cache = out.engine.cache
    for row in (0, 1):
        last = max(i for i, r in enumerate(out.rows) if r == row)
        sequence = out.sequences[last]
        for layer, (keys, values) in full_forward_kv(generator, sequence).items():
            torch.testing.assert_close(cache.keys[layer][row, :, :len(sequence)], keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.values[layer][row, :, :len(sequence)], values, atol=1e-5, rtol=0)


def test_schedules_draw_the_same_tokens(generator):
    """Holding climbing tokens back (TickSchedule) changes when work runs, never what is drawn; a wide batch
    does hold some (more ticks than tokens per sequence)."""
    from nvium_dist.inference.engine import TickSchedule

    prompts = [[(7 * i + 3) % 61, (5 * i) % 60 + 1] for i in range(24)]
    lockstep = generator.generate(prompts, 10, seed=5, schedule=None)
    held = generator.generate(prompts, 10, seed=5, schedule=TickSchedule(max_wait=3))
    assert held.tokens == lockstep.tokens and held.exits == lockstep.exits
    assert lockstep.ticks == 10 and held.ticks > 10
    assert held.engine.segment_tokens == lockstep.engine.segment_tokens  # the same work, at other times


@pytest.mark.parametrize("rows, starts, counts, positions, gathered", [
    ([3, 0, 2], [4, 7, 2], [1, 3, 5], [4, 7, 8, 9, 2, 3, 4, 5, 6], False),  # rows 0..3 read as views, 1 idle
    ([6, 1], [9, 3], [2, 1], [9, 10, 3], True),  # rows scattered over more than twice their number: gathered
])
def test_packed_attention_equals_per_row_attention(rows, starts, counts, positions, gathered):
    """A packed ragged segment batch (rows out of order, carried queues of different lengths) attends exactly
    like each row on its own, and the layers see only the real tokens (no padding)."""
    import torch.nn.functional as F

    from nvium_dist.inference.cache import KVCache

    torch.manual_seed(0)
    heads, hd, max_len = 2, 8, 12
    cache = KVCache([0], 1, 8, max_len, heads, hd, torch.float32, torch.device("cpu"))
    cache.keys[0].normal_()
    cache.values[0].normal_()
    before_k, before_v = cache.keys[0].clone(), cache.values[0].clone()
    batch = cache.prepare(rows, starts, counts)
    total = sum(counts)
    assert batch.positions.tolist() == [positions] and batch.total == total
    assert (batch.row_index is not None) == gathered
    q, k, v = (torch.randn(1, heads, total, hd) for _ in range(3))
    out = cache.layer_caches[0].attend(q, k, v)
    offset = 0
    for row, start, count in zip(rows, starts, counts):
        end = start + count
        keys, values = before_k[row, :, :end].clone(), before_v[row, :, :end].clone()
        keys[:, start:end], values[:, start:end] = k[0, :, offset:offset + count], v[0, :, offset:offset + count]
        mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        want = F.scaled_dot_product_attention(q[:, :, offset:offset + count], keys[None], values[None],
                                              attn_mask=mask[None, None])
        torch.testing.assert_close(out[:, :, offset:offset + count], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(cache.keys[0][row, :, :end], keys, atol=0, rtol=0)
        offset += count
    idle = [row for row in range(8) if row not in rows]
    torch.testing.assert_close(cache.keys[0][idle], before_k[idle], atol=0, rtol=0)  # rows not in the batch


def test_continuous_batching_bad_input(generator):
    from nvium_dist.inference import GenerationError

    with pytest.raises(GenerationError, match="max_batch must be >= 1"):
        generator.generate(RAGGED, 4, max_batch=0)
    with pytest.raises(GenerationError, match="one per prompt"):
        generator.generate(RAGGED, [4, 5], max_batch=2)
    with pytest.raises(GenerationError, match="use max_new_tokens <= 8"):
        generator.generate([[1], [1] * 40], [4, 10], max_batch=1)


def test_zero_new_tokens(generator):
    """max_new_tokens=0 decodes nothing; with flush the prompts alone are completed through every layer."""
    assert generator.generate(RAGGED, 0).tokens == [[]] * 4
    out = generator.generate(RAGGED, [0, 0, 3, 0], flush=True, max_batch=2)
    assert [len(t) for t in out.tokens] == [0, 0, 3, 0]
    cache = out.engine.cache
    for i in (2, 3):  # the last sequences of rows 0 and 1
        sequence, row = out.sequences[i], out.rows[i]
        reference = full_forward_kv(generator, sequence)
        torch.testing.assert_close(cache.keys[5][row, :, :len(sequence)], reference[5][0], atol=1e-5, rtol=0)


def test_pipeline_stage_devices(export_dir):
    """One GPU per stage under NCCL, GPU index = stage rank = LOCAL_RANK; too few GPUs is a clear error
    before any stage process starts."""
    from nvium_dist.inference.pipeline import run_pipeline, stage_device

    assert stage_device(1, 2, "cpu") == torch.device("cpu")
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        assert stage_device(1, 2, "cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=f"pipeline_stages={gpus + 1} on CUDA needs {gpus + 1} GPUs but {gpus} are"):
        run_pipeline(str(export_dir), gpus + 1, [[1, 2]], [4], seed=0, mode="deferred", eos_id=None,
                     sequence_ids=[0], flush=False, device="cuda")


def test_inference_modules_import_each_other_without_a_circle():
    """Every import between nvium_dist.inference modules, function-local ones included, points one way."""
    import ast
    import graphlib

    package = Path(__file__).resolve().parents[1] / "nvium_dist" / "inference"
    graph = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nvium_dist.inference."):
                imported.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = imported - {path.stem}
    assert graph["generator"] >= {"pipeline", "driver"}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a circle
