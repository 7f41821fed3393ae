"""Configuration: sidecar.yml's typed schema (settings.py), hot reload (reload.py), what the
Celery app says (app_settings.py). A leaf: nothing here imports the fold or the intakes.
"""
