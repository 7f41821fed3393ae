"""An app module that fails on import, as a typo in a settings module does."""

from celery import Celery

app = Celery("broken")
app.conf.beat_schedule = {"x": {"task": "t", "schedule": 1 / 0}}
