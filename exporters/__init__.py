"""Prometheus collectors, the HTTP endpoints and the queue probes."""
