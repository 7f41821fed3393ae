"""The ``beat:`` section of sidecar.yml: schedule entries to watch without the app.

    beat:
      - {entry: nightly-cleanup, task: app.cleanup, cron: "0 3 * * *", timezone: Asia/Tokyo}
      - {entry: crawl, task: app.crawl, every: 1800}

Each entry has a ``cron`` expression (five fields: minute hour day-of-month month
day-of-week) or ``every`` (seconds), a ``timezone`` (default UTC), and optionally a
``grace`` in seconds and the ``args``/``kwargs`` that tell apart entries sharing a task. A
bad cron expression or timezone is refused with a message that names the entry. An entry
here replaces the app's entry of the same name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery import Celery
from celery.schedules import crontab, schedule
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_GRACE_FLOOR = 3.0  # seconds
DEFAULT_GRACE_SHARE = 0.1  # of the period


@dataclass(frozen=True)
class Entry:
    name: str
    task: str
    schedule: Any  # a celery schedule (schedule, crontab, solar), aware of its timezone
    args: tuple | None = None  # the run's args, when entries sharing a task differ by them; None: any
    kwargs: tuple | None = None  # the run's kwargs as sorted (key, value) pairs; None: any
    grace: float | None = None  # seconds; None: the default (10 % of the period, at least 3 s)
    source: str = "app"  # "app" or "sidecar.yml"

    def next_due(self, after: float) -> float:
        """The first due time after ``after`` (epoch seconds), by celery's own rules.

        Celery's schedules answer "how long from now"; asked at ``after`` itself (a copy
        whose clock reads ``after``), the answer depends on ``after`` alone, not on the
        wall clock between two calls."""
        schedule = copy.copy(self.schedule)
        moment = datetime.fromtimestamp(after, tz=schedule.tz)
        schedule.nowfun = lambda: moment
        return after + schedule.remaining_estimate(moment).total_seconds()

    def period(self, now: float) -> float:
        """Seconds between the next two due times (an interval's own; a crontab's next gap)."""
        first = self.next_due(now)
        return max(1e-3, self.next_due(first) - first)

    def grace_at(self, now: float) -> float:
        if self.grace is not None:
            return self.grace
        return max(DEFAULT_GRACE_FLOOR, DEFAULT_GRACE_SHARE * self.period(now))


class BeatEntryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entry: str = Field(min_length=1, description="the schedule entry's name")
    task: str = Field(min_length=1, description="the task it sends")
    cron: str | None = Field(None, description='"minute hour day-of-month month day-of-week"')
    every: float | None = Field(None, gt=0, description="seconds between runs")
    timezone: str = Field("UTC", description="of the cron expression")
    grace: float | None = Field(None, gt=0, description="seconds a run may be late; default 10 % of the period, >= 3")
    args: list[Any] | None = Field(None, description="only when several entries send the same task")
    kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schedule(self) -> BeatEntryConfig:
        where = f"beat entry {self.entry!r}"
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"{where}: give exactly one of cron and every")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{where}: unknown timezone {self.timezone!r}") from None
        if self.cron is not None:
            fields = self.cron.split()
            if len(fields) != 5:
                raise ValueError(f"{where}: cron {self.cron!r} must have 5 fields "
                                 "(minute hour day-of-month month day-of-week)")
            try:
                crontab(*fields)
            except (ValueError, TypeError, IndexError) as exc:
                raise ValueError(f"{where}: bad cron expression {self.cron!r}: {exc}") from None
        return self

    def to_entry(self) -> Entry:
        app = _app_in(self.timezone)
        if self.cron is not None:
            minute, hour, day_of_month, month_of_year, day_of_week = self.cron.split()
            sched: Any = crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                                 month_of_year=month_of_year, day_of_week=day_of_week, app=app)
        else:
            sched = schedule(timedelta(seconds=self.every or 0), app=app)
        return Entry(
            name=self.entry, task=self.task, schedule=sched, grace=self.grace, source="sidecar.yml",
            args=None if self.args is None else tuple(self.args),
            kwargs=None if self.kwargs is None else tuple(sorted(self.kwargs.items())),
        )


@cache
def _app_in(timezone: str) -> Celery:
    """A bare app whose only job is to carry a timezone for celery's schedules (no broker)."""
    app = Celery("celery-sidecar-schedules", set_as_current=False)
    app.conf.timezone = timezone
    return app
