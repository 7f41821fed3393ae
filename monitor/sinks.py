"""The push half of the read API: what a sink is, and the updates it receives.

The exporters and the alert engine see each fold step through ``Sink.on_update`` (only the
update kinds a sink declares) and time through ``Sink.on_tick``; everything else they read
through ``StateView.snapshot()`` (monitor/view.py). They import these names from here,
never from monitor/fold/, so the fold's inside can change without touching its readers.
"""

from __future__ import annotations

from celery_sidecar.monitor.fold.pipeline import Sink
from celery_sidecar.monitor.fold.queues import MAX_QUEUES
from celery_sidecar.monitor.fold.records import TASK_KINDS, UNKNOWN, TaskUpdate, Update, WorkerUpdate

__all__ = ["MAX_QUEUES", "TASK_KINDS", "UNKNOWN", "Sink", "TaskUpdate", "Update", "WorkerUpdate"]
