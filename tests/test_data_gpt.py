import numpy as np
import pytest

from data_fixtures import corpus, tokenizer  # noqa: F401


def _build(corpus, tokenizer, blend, cache_dir, seed=1234, n=(400, 20, 0), split="90,10,0", seq=32):  # noqa: F811
    from nvium_dist.data import build_gpt_datasets

    return build_gpt_datasets(blend, split, seq, seed, n, tokenizer, cache_dir=str(cache_dir))


def test_blend_proportions_seed_and_resume(corpus, tokenizer, tmp_path):  # noqa: F811
    from nvium_dist.data import batch_iterator

    blend = ["0.3", corpus["a"], "0.7", corpus["b"]]
    train, valid, test = _build(corpus, tokenizer, blend, tmp_path / "c1")
    assert test is None and len(train) >= 400 and len(valid) >= 20
    ids = np.asarray([train[i]["dataset_id"] for i in range(400)])
    frac_b = float(np.mean(ids == 1))
    assert abs(frac_b - 0.7) < 0.02, frac_b
    item = train[0]
    assert item["tokens"].shape == (32,) and item["labels"].shape == (32,)
    assert np.array_equal(item["tokens"][1:].numpy(), item["labels"][:-1].numpy())  # window of seq+1
    # same seed -> same order (fresh cache dir: rebuilt, not read back)
    again, _, _ = _build(corpus, tokenizer, blend, tmp_path / "c2")
    other, _, _ = _build(corpus, tokenizer, blend, tmp_path / "c3", seed=99)
    first = [train[i]["tokens"] for i in range(50)]
    assert all(np.array_equal(x, again[i]["tokens"]) for i, x in enumerate(first))
    assert not all(np.array_equal(x, other[i]["tokens"]) for i, x in enumerate(first))
    # resume: consumed_samples continues the exact stream
    full = batch_iterator(train, 4, 0, 1)
    batches = [next(full) for _ in range(6)]
    resumed = batch_iterator(train, 4, 0, 1, consumed_samples=12)
    for k in range(3):
        b = next(resumed)
        for key in ("tokens", "labels", "loss_mask"):
            assert torch_equal(b[key], batches[3 + k][key])
    # DP=2 sees exactly what DP=1 sees over 2 micro-batches
    r0 = batch_iterator(train, 2, 0, 2)
    r1 = batch_iterator(train, 2, 1, 2)
    for g in range(3):
        x0, x1 = next(r0), next(r1)
        assert torch_equal(x0["tokens"], batches[g]["tokens"][:2])
        assert torch_equal(x1["tokens"], batches[g]["tokens"][2:])
    b = batches[0]
    assert b["tokens"].dtype.is_floating_point is False and str(b["loss_mask"].dtype) == "torch.float32"
    # without cycling the iterator stops before an incomplete global batch
    n = len(valid)
    assert sum(1 for _ in batch_iterator(valid, 3, 0, 2, cycle=False)) == n // 6


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_single_prefix_valid_blend_and_empty_splits(corpus, tokenizer, tmp_path):  # noqa: F811
    from nvium_dist.data import build_gpt_datasets, parse_blend

    assert parse_blend(["A"]) == (["A"], None)
    assert parse_blend(["0.3", "A.bin", "0.7", "B"]) == (["A", "B"], [0.3, 0.7])
    with pytest.raises(ValueError):
        parse_blend(["0.3", "A", "B"])
    tr, va, te = build_gpt_datasets([corpus["a"]], "969,30,1", 32, 1, (100, 0, 0), tokenizer)  # no cache_dir
    assert tr is not None and va is None and te is None and len(tr) >= 100
    tr, va, te = build_gpt_datasets([corpus["a"]], "1,0,0", 32, 1, (50, 0, 0), tokenizer,
                                    cache_dir=str(tmp_path / "c"), valid_blend=[corpus["b"]])
    assert te is None and va is None and len(tr) >= 50
    tr, va, te = build_gpt_datasets([corpus["a"]], "1,0,0", 32, 1, (50, 10, 0), tokenizer,
                                    cache_dir=str(tmp_path / "c"), valid_blend=[corpus["b"]])
    assert len(va) >= 10
    # a split with no documents in any dataset -> None (megatron-core would loop forever on it)
    with pytest.warns(UserWarning, match="test split"):
        tr, va, te = build_gpt_datasets(["0.5", corpus["a"], "0.5", corpus["b"]], "949,50,1", 32, 1, (10, 10, 10),
                                        tokenizer, cache_dir=str(tmp_path / "c"))
    assert te is None and len(va) >= 10
    # ... in one blended dataset only, with samples requested -> clear error naming it
    from nvium_dist.data import merge_datasets

    ab = merge_datasets([corpus["a"], corpus["b"]], str(tmp_path / "ab_text_document"))["output_prefix"]
    with pytest.raises(ValueError) as e:
        build_gpt_datasets(["0.5", corpus["a"], "0.5", ab], "992,0,8", 32, 1, (10, 0, 10), tokenizer,
                           cache_dir=str(tmp_path / "c"))
    assert "test split" in str(e.value) and corpus["a"] in str(e.value)


def _build_with_and_without_process_group(rank, world_size, prefixes, model, cache_dir):
    """In a fresh process: the blended build with torch.distributed up (rank 0 writes the cache, the others
    read it), then again after the group is gone (the private group path must leave none behind)."""
    import torch.distributed as dist

    from nvium_dist.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(model)
    blend = ["0.5", prefixes["a"], "0.5", prefixes["b"]]
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        train, _, _ = _build(prefixes, tokenizer, blend, cache_dir / "shared")
        ref, _, _ = _build(prefixes, tokenizer, blend, cache_dir / "shared")  # cache hit path
        assert all(np.array_equal(train[i]["tokens"], ref[i]["tokens"]) for i in range(20))
    finally:
        dist.destroy_process_group()
    alone, _, _ = _build(prefixes, tokenizer, blend, cache_dir / f"alone-{rank}")
    assert not dist.is_initialized()
    assert all(np.array_equal(train[i]["tokens"], alone[i]["tokens"]) for i in range(20))
    return [train[i]["tokens"].tolist() for i in range(20)]


def test_build_with_torch_distributed_initialised(corpus, tokenizer, tmp_path):  # noqa: F811
    # in fresh processes: a test that ran earlier in this one may have left a process group up
    from distributed_runner import run_distributed

    prefixes = {"a": corpus["a"], "b": corpus["b"]}
    ranks = run_distributed(_build_with_and_without_process_group, 2, prefixes, corpus["model"], tmp_path)
    train, _, _ = _build(corpus, tokenizer, ["0.5", corpus["a"], "0.5", corpus["b"]], tmp_path / "here")
    assert ranks[0] == ranks[1] == [train[i]["tokens"].tolist() for i in range(20)]


def test_pickled_index_cache_is_named(corpus, tokenizer, tmp_path):  # noqa: F811
    """Issue 22 case 12: an index-cache .npy holding pickled objects is refused naming the file and the fix
    (today numpy's unnamed "Array can't be memory-mapped"), and never loaded; a clean cache builds again."""
    import numpy as np

    from nvium_dist.data.indexed import DatasetFormatError

    cache = tmp_path / "cache"
    _build(corpus, tokenizer, [corpus["a"]], cache)
    index = sorted(cache.rglob("*shuffle_index.npy"))[0]
    np.save(index, np.array([{"planted": True}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetFormatError, match=f"{index} holds pickled Python objects.*Delete {cache}"):
        _build(corpus, tokenizer, [corpus["a"]], cache)
    index.unlink()
    assert _build(corpus, tokenizer, [corpus["a"]], cache)[0] is not None
