"""Benchmarks: model quality, the ranker, the gateway, rollouts and the GPU check (`make bench-*`)."""
