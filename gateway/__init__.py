"""The recommendation gateway: fans a Recommend call out to retrieval and ranking, with deadlines,
retries and degradation."""
