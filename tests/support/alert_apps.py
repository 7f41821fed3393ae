"""A Celery app for the alert tests: a payment task that fails the way the test asks.

Run a worker with ``start_worker(..., app="tests.support.alert_apps")``. The producer side
of a test sends tasks by name, so it does not import this module.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("alerting", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(
    task_send_sent_event=True,
    worker_send_task_events=True,
    task_default_queue="celery",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


class PaymentDeclined(Exception):
    """The failure the alert tests look for in Slack."""


class GatewayTimeout(Exception):
    """A second exception class, for a failure that must not fold into PaymentDeclined's storm."""


_EXCEPTIONS = {cls.__name__: cls for cls in (PaymentDeclined, GatewayTimeout)}


@app.task(name="alerting.charge_card")
def charge_card(order_id: str, card_token: str | None = None, error: str = "PaymentDeclined") -> None:
    # card_token stands for what must not reach Slack unless the operator opts in.
    raise _EXCEPTIONS[error](f"card declined for order {order_id}")


@app.task(name="alerting.charge_card_with_retries", bind=True, max_retries=2, default_retry_delay=0.1)
def charge_card_with_retries(self, order_id: str) -> None:
    raise self.retry(exc=PaymentDeclined(f"card declined for order {order_id} after retries"))
