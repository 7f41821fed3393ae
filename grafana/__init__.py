"""Grafana provisioning and the dashboards, shipped as package data."""
