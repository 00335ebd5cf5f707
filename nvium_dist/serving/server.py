"""Command line of the server: load an export, bind, serve until SIGTERM / Ctrl-C, exit 0.

    python tools/serve.py --model exports/tiny                        # http://127.0.0.1:8000/v1
    python -m nvium_dist.serving --model exports/tiny --port 8001 --max-batch 8 --api-key secret

SIGTERM stops accepting connections, lets in-flight requests finish for up to --grace-period seconds (then
cancels them), stops the scheduler and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from nvium_dist.cli import float_at_least, int_at_least, load_generator


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (tools/export_checkpoint.py --output)")
    p.add_argument("--served-model-name", help="the name clients pass as 'model' (default: the export's directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local connections only)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="0: any free port (printed at start)")
    p.add_argument("--max-batch", type=int_at_least(1), default=16, help="rows decoded together")
    p.add_argument("--max-queue", type=int_at_least(0), default=64,
                   help="requests that may wait for a row; beyond that a request gets 429 with Retry-After")
    p.add_argument("--max-n", type=int_at_least(1), default=16, help="largest 'n' (choices per prompt) accepted")
    p.add_argument("--mode", choices=["deferred", "full"], default="deferred",
                   help="how plain sampling runs: deferred decoding, or every layer every token (the baseline)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int_at_least(0), default=0,
                   help="torch CPU threads (0: 1 thread for models narrower than 1024, else torch's default)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the /v1 routes")
    p.add_argument("--grace-period", type=float_at_least(0), default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port}: {err.strerror or err}; pick another --port "
              "(0: any free one) or --host", file=sys.stderr)
        return 2

    import uvicorn

    from nvium_dist.serving.app import create_app
    from nvium_dist.serving.metrics import ServerMetrics
    from nvium_dist.serving.scheduler import Scheduler

    generator, error = load_generator(args.model, args.device, args.threads)
    if error:
        print(error, file=sys.stderr)
        return 2
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    metrics = ServerMetrics(generator.config.exit_layers)
    scheduler = Scheduler(generator, args.max_batch, args.max_queue, full_depth=args.mode == "full", metrics=metrics)
    app = create_app(generator, scheduler, metrics, name, args.api_key, args.max_n)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.grace_period,
                            access_log=False)
    host, port = sock.getsockname()[:2]
    print(f"serving {name!r} ({args.mode}) on http://{host}:{port}/v1", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; these handlers make that
    # a no-op, so a SIGTERM'd server exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
