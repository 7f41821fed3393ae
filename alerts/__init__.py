"""Alert engine, notifiers and the Prometheus alert rules."""
