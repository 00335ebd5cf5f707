"""An OpenAI-compatible HTTP server for N-vium exports on the exact deferred engine, with continuous batching
(nvium_dist.serving.scheduler), OpenAI's request and error shapes (protocol), the routes (app), Prometheus
metrics (metrics) and the command line (server: `python -m nvium_dist.serving --model EXPORT`)."""
