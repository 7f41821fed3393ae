"""The app of the queue-pressure tests: tasks that take a while, prefetch that hides them from
the broker's list (acks_late, a high prefetch multiplier), a result backend for the truth,
and two remote-control commands that make a worker a zombie consumer and bring it back."""

import os
import time

from celery import Celery
from celery.worker.control import control_command

app = Celery("pressure", broker=os.environ.get("CELERY_BROKER_URL"),
             backend=os.environ.get("PRESSURE_RESULT_BACKEND"))
app.conf.update(
    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True, worker_send_task_events=True,
    task_send_sent_event=True, task_acks_late=True, worker_prefetch_multiplier=64,
)


@app.task(name="pressure.nap")
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@control_command()
def zombie(state) -> dict:
    """Cancel the task consumer from inside, as a broker reconnect the worker does not recover
    from leaves it: heartbeats go on and inspect's active_queues still lists the queues, but
    nothing is delivered."""
    state.consumer.task_consumer.cancel()
    return {"ok": "consumer cancelled"}


@control_command()
def revive(state) -> dict:
    state.consumer.task_consumer.consume()
    return {"ok": "consuming again"}
