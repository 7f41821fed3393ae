"""The app of the loss tests: quick tasks, a task that retries once, and a result backend, so
the test knows the truth (every task sent, and when each one finished) whatever the event
stream carried."""

import os

from celery import Celery

app = Celery("loss", broker=os.environ.get("CELERY_BROKER_URL"), backend=os.environ.get("LOSS_RESULT_BACKEND"))
app.conf.update(
    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True, worker_send_task_events=True,
    task_send_sent_event=True, worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=int(os.environ.get("LOSS_MAX_TASKS_PER_CHILD", "0")) or None,
)


@app.task(name="loss.quick")
def quick(n: int, pad: str = "") -> str:
    # The pad comes back in the result: events carry ~1 KB reprs of args and result, so a
    # paused subscriber overflows the broker's buffers sooner.
    return pad


@app.task(name="loss.flaky", bind=True, max_retries=1, default_retry_delay=0)
def flaky(self, n: int) -> int:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return n


@app.task(name="loss.refuse", bind=True, acks_late=True)  # Reject only rejects what is not acked yet
def refuse(self) -> None:
    # Reject sends task-failed, then task-rejected: the late event must keep its task.
    from celery.exceptions import Reject

    raise Reject("refused", requeue=False)
