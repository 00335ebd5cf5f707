#!/usr/bin/env python
"""Scale smoke test (by hand; too slow for CI): the 1.5B config at full width (d1536, 12 x 128 heads,
MLP 4096, vocab 32000) but depth 8 with exits 2/4/6, two full optimizer steps with ZeRO-3 over 2 CPU
processes at sequence length 64. Checks a finite loss and gradients in every exit, router and adapter;
prints peak memory per rank.

  torchrun --standalone --nproc-per-node 2 tools/scale_smoke.py
"""
import argparse
import json
import resource
import sys
from pathlib import Path

from nvium_dist.cli import int_at_least

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "pretrain/configs/nvium-1.5b.yaml"))
    parser.add_argument("--steps", type=int_at_least(1), default=2)
    args = parser.parse_args(argv)

    from nvium_dist.config import ConfigError, load_config

    try:
        config = load_config(args.config, [
            "model.num_layers=8", "model.exits=[2,4,6]", "model.seq_length=64", "parallel.device=cpu",
            "parallel.zero_stage=3", "training.micro_batch_size=1", "training.global_batch_size=2",
            f"training.train_iters={args.steps}", "training.run_dir=/tmp/nvium-scale-smoke",
            "data.allow_default_corpus=true"])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    import torch
    import torch.distributed as dist

    from nvium_dist.mixture import nvium_loss
    from nvium_dist.training.trainer import Trainer

    trainer = Trainer(config)
    model = trainer._build_model(None)
    engine = trainer._build_engine(model, lr_offset=0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(args.steps):
        tokens = torch.randint(0, config.model.vocab_size, (1, 65), generator=generator)
        terms = engine(tokens[:, :-1], tokens[:, 1:])
        loss = nvium_loss(terms, torch.ones(1, 64), beta=0.15, in_router_warmup=False).loss
        engine.backward(loss)
        import deepspeed

        grads = {}
        for name, param in engine.module.named_parameters():
            if any(part in name for part in (".router.", ".adapter.", "heads.")):
                grad = deepspeed.utils.safe_get_full_grad(param)
                grads[name] = float(grad.abs().sum()) if grad is not None else 0.0
        engine.step()
        losses.append(loss.item())
    without_grad = sorted(name for name, value in grads.items() if value == 0.0 and not name.endswith("w2.weight"))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, round(peak_gib, 2))
    if dist.get_rank() == 0:
        print(json.dumps({"losses": losses, "finite": all(map(lambda v: v == v and abs(v) < 1e9, losses)),
                          "head_parameters_checked": len(grads), "without_gradient": without_grad,
                          "peak_rss_gib_per_rank": peaks}, indent=2))
    ok = all(v == v for v in losses) and not without_grad
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
