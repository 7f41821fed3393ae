"""Grafana provisioning and the dashboards, shipped as package data.

``dashboards.py`` is the build-time code that generates ``dashboards/*.json`` (scripts/generate);
nothing imports it at run time.
"""
