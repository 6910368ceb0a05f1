"""Offline batch scoring: the gateway's pipeline run in-process over the ranking and retrieval
models (it may import both sides)."""
