"""Helpers shared by the tests: background servers, service processes, tritonclient probes."""
