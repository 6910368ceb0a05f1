"""The retrieval service: candidate items by inner-product search over exported item embeddings,
popular items, and mapped representations for users new to a domain."""
