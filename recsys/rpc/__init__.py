"""The shared gRPC kit: errors, interceptors, metrics, health, settings, logging, TLS and the
server lifecycle, used by every service (serving and gateway import it; it imports neither)."""
