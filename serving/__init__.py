"""The serving applications: the ranking service (serving.ranking) and the retrieval service
(serving.retrieval)."""
