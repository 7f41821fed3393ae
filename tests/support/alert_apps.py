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



@app.task(name="alerting.load_invoice")
def load_invoice(invoice_id: str) -> str:
    # Ten frames of the app's own below the task and Celery's two above it: a 13-frame
    # traceback, whose last frame and exception line are what on-call needs to see. The two
    # helpers take turns, so Python does not fold the frames into "[Previous line repeated]".
    return _read_invoice({"invoice_id": invoice_id}, depth=9)


def _read_invoice(record: dict[str, str], depth: int) -> str:
    return _read_customer(record, depth - 1)


def _read_customer(record: dict[str, str], depth: int) -> str:
    if depth > 0:
        return _read_invoice(record, depth - 1)
    raise KeyError("customer_id")
