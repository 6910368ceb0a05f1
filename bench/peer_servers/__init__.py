"""Peer servers of `make bench-peers`, each run as its own process (KServe and PyTriton from their
own virtualenvs, so these modules import nothing of the project but the plain server)."""
