#!/usr/bin/env python
"""Serve an N-vium export behind OpenAI's HTTP API (see nvium_dist/serving/server.py and docs/serving.md).

    python tools/serve.py --model exports/tiny --port 8000
"""
import sys

from nvium_dist.serving.server import main

if __name__ == "__main__":
    sys.exit(main())
