"""The shared library: the wire contract (generated stubs), the gRPC kit, the model repository
and the candidate types. It imports nothing else of this project."""
