"""Reading a Celery app's own settings: ``celery -A proj sidecar`` and ``celery-sidecar run --app``.

The sidecar imports the app module (as ``celery -A`` does: the current directory first on
sys.path) and reads its configuration: the broker URL and transport options, its queues
(``task_default_queue``, ``task_queues``, ``task_routes``), its ``beat_schedule`` and
``timezone``, and its task time limits. Importing an app starts nothing by itself (no
worker, no Beat, no connection); the sidecar then makes only its own connections.

An app that fails to import is one error naming the module and the exception, not a
traceback. Explicit flags and sidecar.yml override whatever the app says.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.app.utils import find_app
from celery.schedules import maybe_schedule

from celery_sidecar.monitor.config.app_settings import AppDefaults
from celery_sidecar.monitor.config.beat_entries import Entry


class AppError(Exception):
    """The app cannot be loaded or read; the message says which and why, in one line."""


@dataclass(frozen=True)
class AppSettings:
    """The broker settings the app uses (flags override them), and its other defaults."""

    broker_url: str | None
    transport_options: dict[str, Any] = field(default_factory=dict)
    broker_use_ssl: Any = None  # the app's TLS options for the broker (CA, client certificate and key)
    defaults: AppDefaults = field(default_factory=AppDefaults)


def load_app(spec: str) -> Celery:
    """The app at ``spec`` (``proj``, ``proj.celery`` or ``proj.celery:app``), as celery -A finds it."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = find_app(spec)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        module, _, attr = spec.partition(":")
        if attr and isinstance(exc, ModuleNotFoundError) and _imports(module):
            # find_app retries a missing attribute as a module name; say what is really missing.
            raise AppError(f"cannot load the Celery app {spec!r}: module {module!r} has no attribute "
                           f"{attr!r}") from None
        raise AppError(f"cannot load the Celery app {spec!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(app, Celery):
        raise AppError(f"{spec!r} is not a Celery app (found {type(app).__name__})")
    return app


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - only whether it imports matters here
        return False
    return True


def read(app: Celery) -> AppSettings:
    """What the sidecar takes from the app."""
    conf = app.conf
    try:
        return AppSettings(
            broker_url=conf.broker_read_url or conf.broker_url,
            transport_options=dict(conf.broker_transport_options or {}),
            broker_use_ssl=conf.broker_use_ssl or None,
            defaults=AppDefaults(
                queues=tuple(sorted(_queues(app))),
                beat=tuple(_beat(app)),
                time_limits=_time_limits(app),
                default_time_limit=float(conf.task_time_limit) if conf.task_time_limit else None,
                timezone=str(conf.timezone or "UTC"),
                routed=_routed(app),
                route_patterns=tuple(_route_patterns(app)),
                default_queue=conf.task_default_queue or "celery",
            ),
        )
    except AppError:
        raise
    except Exception as exc:  # noqa: BLE001 - a setting we cannot read: say which app and why
        raise AppError(f"cannot read the settings of the Celery app {app.main!r}: "
                       f"{type(exc).__name__}: {exc}") from None


def _queues(app: Celery) -> set[str]:
    conf = app.conf
    queues = {conf.task_default_queue or "celery"}
    for queue in conf.task_queues or ():
        name = getattr(queue, "name", queue)
        if isinstance(name, str):
            queues.add(name)
    routes = conf.task_routes or ()
    for router in routes if isinstance(routes, list | tuple) else (routes,):
        if isinstance(router, dict):  # functions and strings route at run time: nothing to read
            for route in router.values():
                queue = route.get("queue") if isinstance(route, dict) else route
                name = getattr(queue, "name", queue)
                if isinstance(name, str):
                    queues.add(name)
    return queues


def _routed(app: Celery) -> dict[str, str]:
    """The queue of every task the app registered, by celery's own router (functions too)."""
    routed = {}
    for name in app.tasks:
        if name.startswith("celery."):
            continue
        try:
            queue = app.amqp.router.route({}, name).get("queue")
        except Exception:  # noqa: BLE001 - a router that fails for a name: that name is unrouted
            continue
        queue = getattr(queue, "name", queue)
        if isinstance(queue, str) and queue:
            routed[name] = queue
    return routed


def _route_patterns(app: Celery) -> list[tuple[str, str]]:
    """task_routes' dict entries, for task names the app did not register (sent by name)."""
    patterns = []
    routes = app.conf.task_routes or ()
    for router in routes if isinstance(routes, list | tuple) else (routes,):
        if isinstance(router, dict):
            for pattern, route in router.items():
                queue = route.get("queue") if isinstance(route, dict) else route
                queue = getattr(queue, "name", queue)
                if isinstance(pattern, str) and isinstance(queue, str):
                    patterns.append((pattern, queue))
    return patterns


def _beat(app: Celery) -> list[Entry]:
    schedule = app.conf.beat_schedule or {}
    tasks = Counter(spec.get("task") for spec in schedule.values() if isinstance(spec, dict))
    entries = []
    for name, spec in schedule.items():
        if not isinstance(spec, dict) or not spec.get("task"):
            raise AppError(f"beat_schedule entry {name!r} has no task")
        try:
            sched = maybe_schedule(spec["schedule"], False, app)
        except (KeyError, TypeError, ValueError) as exc:
            raise AppError(f"beat_schedule entry {name!r}: its schedule cannot be read: {exc}") from None
        shared = tasks[spec["task"]] > 1  # args/kwargs tell entries apart only when they share a task
        args, kwargs = spec.get("args"), spec.get("kwargs")
        entries.append(Entry(
            name=name, task=spec["task"], schedule=sched, source="app",
            args=tuple(args or ()) if shared else None,
            kwargs=tuple(sorted((kwargs or {}).items())) if shared else None,
        ))
    return entries


def _time_limits(app: Celery) -> dict[str, float]:
    limits: dict[str, float] = {}
    default = app.conf.task_time_limit
    for name, task in app.tasks.items():  # the app's own tasks, as registered on import
        limit = getattr(task, "time_limit", None)
        # A task without its own limit is given task_time_limit when bound: that is the default's.
        if not name.startswith("celery.") and limit and limit != default:
            limits[name] = float(limit)
    annotations = app.conf.task_annotations
    for annotation in annotations if isinstance(annotations, list | tuple) else (annotations,):
        if isinstance(annotation, dict):
            for name, values in annotation.items():
                if isinstance(values, dict) and values.get("time_limit") and name != "*":
                    limits[name] = float(values["time_limit"])
    return limits
