"""Package data: sidecar.yml with the documented defaults (`celery-sidecar config example`)."""
