"""Package data: the nginx template `celery-sidecar render` fills in (allow-list, basic auth)."""
