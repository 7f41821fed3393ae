"""`celery-sidecar render --kubernetes`: plain manifests for running the sidecar on Kubernetes.

The sidecar's Deployment and Service, its sidecar.yml as a ConfigMap (edits reach the running
sidecar through the kubelet's symlink swap and the hot reload), the Prometheus Operator's
ServiceMonitor (or PodMonitor) and PrometheusRule (the groups of alerts/prometheus/rules.yml,
the one source of the rules), one ConfigMap per Grafana dashboard for Grafana's dashboard
sidecar and, by flag, KEDA ScaledObjects, a NetworkPolicy and, for HA, two replicas with a
PodDisruptionBudget; and a kustomization.yaml listing them. docs/kubernetes.md explains them.

Like render's other flags, each of these also reads an environment variable. The output is a
function of the flags and the installed package only: keys sorted, nothing timestamped, so
rendering again with the same inputs writes the same bytes. No Secret is written: the
Deployment references one the operator creates.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click
import yaml

from celery_sidecar import kubernetes_objects as objects
from celery_sidecar import resources

MONITORS = ("service", "pod")
DEFAULT_DASHBOARD_LABEL = "grafana_dashboard=1"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_URL = re.compile(r"^https?://[^\s\"'\\{}<>`|^]+$")
# Room for "-<queue>" after the name in a ScaledObject's name (63 at most).
MAX_NAME = 50


class KubernetesSettingsError(ValueError):
    """Flags the manifests cannot be rendered with; each problem starts with its variable."""

    def __init__(self, *problems: str) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Resources:
    cpu_request: str = "100m"
    cpu_limit: str = "1"  # empty: no limit
    memory_request: str = "256Mi"
    memory_limit: str = "1Gi"


@dataclass(frozen=True)
class Scaling:
    queues: tuple[tuple[str, str], ...] = ()  # (queue, worker Deployment)
    min_replicas: int = 1
    max_replicas: int = 10
    fallback_replicas: int | None = None  # None: max_replicas
    prometheus_url: str = ""

    @property
    def fallback(self) -> int:
        return self.max_replicas if self.fallback_replicas is None else self.fallback_replicas


def _default_image() -> str:
    try:
        return f"celery-sidecar:{version('celery-sidecar')}"
    except PackageNotFoundError:
        return "celery-sidecar:local"


@dataclass(frozen=True)
class KubernetesSettings:
    scrape_interval: str = "15s"
    namespace: str = "default"
    name: str = "celery-sidecar"
    image: str = field(default_factory=_default_image)
    secret_name: str = "celery-sidecar"
    broker_tls_secret: str = ""  # empty: none mounted
    sidecar_config: str = field(default_factory=lambda: resources.read_text(resources.DEFAULT_CONFIG))
    monitor: str = "service"
    prometheus_labels: tuple[tuple[str, str], ...] = ()
    dashboard_label: tuple[str, str] = ("grafana_dashboard", "1")
    dashboard_folder_annotation: str = "grafana_folder"
    dashboard_folder: str = "Celery"
    dashboard_namespace: str = ""  # empty: the namespace
    ha: bool = False
    network_policy: bool = False
    monitoring_namespace: str = "monitoring"
    scaling: Scaling = Scaling()
    resources: Resources = Resources()

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise KubernetesSettingsError(*problems)

    @property
    def config_map_name(self) -> str:
        return f"{self.name}-config"


def label_problem(key: str, value: str | None = None) -> str | None:
    """Why ``key`` (and ``value``) cannot be a Kubernetes label (or annotation key), or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"{key!r}: its prefix is not a DNS subdomain"
    if len(name) > 63 or not _LABEL_NAME.match(name):
        return f"{key!r} is not a label key (letters, digits, - _ . inside; at most 63)"
    if value is not None and value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return f"{key}={value!r}: the value is not a label value (letters, digits, - _ . inside; at most 63)"
    return None


def _quantity(text: str) -> float | None:
    m = _QUANTITY.match(text)
    return float(m.group(1)) * _UNITS[m.group(2) or ""] if m else None


def _resource_problems(r: Resources) -> list[str]:
    problems = []
    for variable, value in (("K8S_CPU_REQUEST", r.cpu_request), ("K8S_CPU_LIMIT", r.cpu_limit),
                            ("K8S_MEMORY_REQUEST", r.memory_request), ("K8S_MEMORY_LIMIT", r.memory_limit)):
        if value and _quantity(value) is None:
            problems.append(f"{variable}: {value!r} is not a quantity like 250m, 1, 256Mi or 1Gi")
    for kind, request, limit in (("CPU", r.cpu_request, r.cpu_limit), ("MEMORY", r.memory_request, r.memory_limit)):
        low, high = _quantity(request or "0"), _quantity(limit or "0")
        if low is not None and high is not None and limit and low > high:
            problems.append(f"K8S_{kind}_REQUEST: {request} is more than K8S_{kind}_LIMIT {limit}")
    return problems


def _scaling_problems(s: Scaling) -> list[str]:
    problems = []
    seen: dict[str, str] = {}
    for queue, deployment in s.queues:
        if not queue or any(c in queue for c in "\r\n\0"):
            problems.append(f"K8S_SCALE_QUEUES: {queue!r} is not a queue name")
        if len(deployment) > 253 or not _DNS_SUBDOMAIN.match(deployment):
            problems.append(f"K8S_SCALE_QUEUES: {deployment!r} (for queue {queue!r}) is not a Deployment name")
        elif deployment in seen:
            # KEDA lets one ScaledObject manage a workload; two would fight over its replicas.
            problems.append(f"K8S_SCALE_QUEUES: queues {seen[deployment]!r} and {queue!r} both scale Deployment "
                            f"{deployment!r}; each queue needs its own worker Deployment")
        seen.setdefault(deployment, queue)
    if s.min_replicas < 0 or s.max_replicas < 1 or s.min_replicas > s.max_replicas:
        problems.append(f"K8S_SCALE_MIN_REPLICAS / K8S_SCALE_MAX_REPLICAS: {s.min_replicas} / {s.max_replicas} "
                        "must be 0 <= min <= max and max >= 1")
    if s.fallback_replicas is not None and s.fallback_replicas < 0:
        problems.append(f"K8S_SCALE_FALLBACK_REPLICAS: {s.fallback_replicas} is negative")
    if s.queues and not _URL.match(s.prometheus_url):
        problems.append(f"K8S_SCALE_PROMETHEUS_URL: {s.prometheus_url!r} is not an http(s) URL")
    return problems


def _name_problems(s: KubernetesSettings) -> list[str]:
    problems = []
    namespaces = [("K8S_NAMESPACE", s.namespace), ("K8S_MONITORING_NAMESPACE", s.monitoring_namespace)]
    if s.dashboard_namespace:  # empty: the namespace's
        namespaces.append(("K8S_DASHBOARD_NAMESPACE", s.dashboard_namespace))
    for variable, value in namespaces:
        if len(value) > 63 or not _DNS_LABEL.match(value):
            problems.append(f"{variable}: {value!r} is not a namespace name (lower case letters, digits, -)")
    if len(s.name) > MAX_NAME or not _DNS_1035.match(s.name):
        problems.append(f"K8S_NAME: {s.name!r} must start with a letter, hold only lower case letters, digits "
                        f"and -, and be at most {MAX_NAME} long")
    secrets = [("K8S_SECRET_NAME", s.secret_name)]
    if s.broker_tls_secret:  # empty: none
        secrets.append(("K8S_BROKER_TLS_SECRET", s.broker_tls_secret))
    for variable, value in secrets:
        if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
            problems.append(f"{variable}: {value!r} is not a Secret name")
    if not s.image or any(c.isspace() for c in s.image):
        problems.append(f"SIDECAR_IMAGE: {s.image!r} is not an image reference")
    return problems


def _problems(s: KubernetesSettings) -> list[str]:
    problems = _name_problems(s)
    if s.monitor not in MONITORS:
        problems.append(f"K8S_MONITOR: {s.monitor!r} is not one of {', '.join(MONITORS)}")
    for key, value in s.prometheus_labels:
        if (problem := label_problem(key, value)) is not None:
            problems.append(f"K8S_PROMETHEUS_LABELS: {problem}")
    if (problem := label_problem(*s.dashboard_label)) is not None:
        problems.append(f"K8S_DASHBOARD_LABEL: {problem}")
    if (problem := label_problem(s.dashboard_folder_annotation)) is not None:
        problems.append(f"K8S_DASHBOARD_FOLDER_ANNOTATION: {problem}")
    return problems + _resource_problems(s.resources) + _scaling_problems(s.scaling)


# -- the manifests as files ---------------------------------------------------------------------


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line strings (sidecar.yml, the dashboards, PromQL) as literal blocks, as written.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class PythonDumper(yaml.SafeDumper):
    pass


# libyaml's emitter when PyYAML has it: the same YAML (tests/test_kubernetes.py compares the
# two), in a fraction of the time the pure Python one takes over the dashboards' 100 KB.
class Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    pass


for _dumper in (PythonDumper, Dumper):
    _dumper.add_representer(str, _str)


def dump(obj: Any, dumper: type = Dumper) -> str:
    return yaml.dump(obj, Dumper=dumper, sort_keys=True, allow_unicode=True, width=1 << 20,
                     default_flow_style=False)


def manifests(s: KubernetesSettings, rules_text: str) -> dict[str, str]:
    """File name -> YAML text, in the order kustomization.yaml lists them."""
    files: dict[str, Any] = {
        "sidecar-config.yaml": objects.config_map(s),
        "deployment.yaml": objects.deployment(s),
        "service.yaml": objects.service(s),
        f"{s.monitor}monitor.yaml": objects.monitor(s),
        "prometheusrule.yaml": objects.prometheus_rule(s, yaml.safe_load(rules_text)),
    }
    for stem, config_map in objects.dashboards(s):
        files[f"dashboard-{stem}.yaml"] = config_map
    if s.network_policy:
        files["networkpolicy.yaml"] = objects.network_policy(s)
    if s.ha:
        files["poddisruptionbudget.yaml"] = objects.pod_disruption_budget(s)
    for slug, scaled in objects.scaled_objects(s):
        files[f"scaledobject-{slug}.yaml"] = scaled
    texts = {name: dump(obj) for name, obj in files.items()}
    texts["kustomization.yaml"] = dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                        "resources": list(files)})
    return texts


# -- flags --------------------------------------------------------------------------------------


def _option(*decls: str, env: str, **kw: Any) -> Callable:
    return click.option(*decls, envvar=env, show_envvar=True, **kw)


def kubernetes_options(command: Callable) -> Callable:
    """render's flags for --kubernetes; --grafana-url and --scrape-interval are render's own."""
    options = [
        _option("--kubernetes", "manifests", env="RENDER_KUBERNETES", is_flag=True,
                help="Write Kubernetes manifests into OUT instead of the compose stack's configs "
                     "(docs/kubernetes.md). The flags below apply only then."),
        _option("--namespace", env="K8S_NAMESPACE", default="default", show_default=True),
        _option("--name", env="K8S_NAME", default="celery-sidecar", show_default=True,
                help="Name of the Deployment, Service and monitors; the ConfigMaps' prefix."),
        _option("--image", env="SIDECAR_IMAGE", default=_default_image, show_default="celery-sidecar:VERSION",
                help="The sidecar image, built from the Dockerfile."),
        _option("--secret-name", env="K8S_SECRET_NAME", default="celery-sidecar", show_default=True,
                help="The Secret (not rendered) with CELERY_BROKER_URL and, optionally, SLACK_WEBHOOK_URL, "
                     "SLACK_BOT_TOKEN, SLACK_CHANNEL, SIDECAR_BROKER_USE_SSL."),
        _option("--broker-tls-secret", env="K8S_BROKER_TLS_SECRET", default="",
                help="A Secret (not rendered) with the broker's CA and client certificate and key, mounted "
                     "read-only at /etc/celery-sidecar-tls for SIDECAR_BROKER_USE_SSL to name."),
        _option("--sidecar-config", env="K8S_SIDECAR_CONFIG", type=click.Path(dir_okay=False, path_type=Path),
                help="sidecar.yml for the ConfigMap (checked first). Default: the documented defaults."),
        _option("--monitor", env="K8S_MONITOR", type=click.Choice(MONITORS), default="service", show_default=True,
                help="Scrape through a ServiceMonitor or a PodMonitor."),
        _option("--prometheus-label", "prometheus_labels", env="K8S_PROMETHEUS_LABELS", multiple=True,
                metavar="KEY=VALUE", help="Label of the monitor and the PrometheusRule, e.g. "
                "release=kube-prometheus-stack (what the Prometheus selects them by). Repeatable."),
        _option("--dashboard-label", env="K8S_DASHBOARD_LABEL", default=DEFAULT_DASHBOARD_LABEL, show_default=True,
                metavar="KEY=VALUE", help="The label Grafana's dashboard sidecar looks for."),
        _option("--dashboard-folder-annotation", env="K8S_DASHBOARD_FOLDER_ANNOTATION", default="grafana_folder",
                show_default=True, help="The annotation the dashboard sidecar reads the folder from."),
        _option("--dashboard-folder", env="K8S_DASHBOARD_FOLDER", default="Celery", show_default=True),
        _option("--dashboard-namespace", env="K8S_DASHBOARD_NAMESPACE", default="",
                show_default="--namespace", help="Where the dashboard ConfigMaps go (Grafana's, if its "
                "sidecar watches only its own namespace)."),
        _option("--ha", env="K8S_HA", is_flag=True,
                help="Two replicas and a PodDisruptionBudget. Needs a Redis broker (docs/kubernetes.md)."),
        _option("--network-policy", env="K8S_NETWORK_POLICY", is_flag=True,
                help="A NetworkPolicy: only --monitoring-namespace may connect to the sidecar."),
        _option("--monitoring-namespace", env="K8S_MONITORING_NAMESPACE", default="monitoring", show_default=True),
        _option("--scale-queue", "scale_queues", env="K8S_SCALE_QUEUES", multiple=True, metavar="QUEUE=DEPLOYMENT",
                help="A KEDA ScaledObject scaling DEPLOYMENT on how many workers QUEUE needs. Repeatable."),
        _option("--scale-min-replicas", env="K8S_SCALE_MIN_REPLICAS", type=int, default=1, show_default=True),
        _option("--scale-max-replicas", env="K8S_SCALE_MAX_REPLICAS", type=int, default=10, show_default=True),
        _option("--scale-fallback-replicas", env="K8S_SCALE_FALLBACK_REPLICAS", type=int, default=None,
                show_default="--scale-max-replicas", help="Replicas while the metric cannot be read."),
        _option("--scale-prometheus-url", env="K8S_SCALE_PROMETHEUS_URL", default="",
                show_default="http://prometheus-operated.MONITORING_NAMESPACE.svc:9090",
                help="The Prometheus KEDA queries."),
        _option("--cpu-request", env="K8S_CPU_REQUEST", default="100m", show_default=True),
        _option("--cpu-limit", env="K8S_CPU_LIMIT", default="1", show_default=True, help="none: no limit."),
        _option("--memory-request", env="K8S_MEMORY_REQUEST", default="256Mi", show_default=True),
        _option("--memory-limit", env="K8S_MEMORY_LIMIT", default="1Gi", show_default=True, help="none: no limit."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


KUBERNETES_FLAGS = ("namespace", "name", "image", "secret_name", "sidecar_config", "monitor", "prometheus_labels",
                    "dashboard_label", "dashboard_folder_annotation", "dashboard_folder", "dashboard_namespace",
                    "ha", "network_policy", "monitoring_namespace", "scale_queues", "scale_min_replicas",
                    "scale_max_replicas", "scale_fallback_replicas", "scale_prometheus_url", "cpu_request",
                    "cpu_limit", "memory_request", "memory_limit")


def _pairs(items: tuple[str, ...] | list[str], variable: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    found = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"{variable}: {item!r} is not KEY=VALUE")
            continue
        found.append((key, value))
    return tuple(found)


def _config_text(path: Path | None, problems: list[str]) -> str:
    """The sidecar.yml for the ConfigMap: a refused file is refused here, not by a pod later."""
    from celery_sidecar.monitor.config.settings import ConfigError, load_config

    if path is None:
        return resources.read_text(resources.DEFAULT_CONFIG)
    try:
        load_config(path)
        return path.read_text(encoding="utf-8")
    except ConfigError as exc:
        problems.append(f"K8S_SIDECAR_CONFIG: {exc}")
    except (OSError, ValueError) as exc:
        problems.append(f"K8S_SIDECAR_CONFIG: {path}: cannot be used as a config file: {exc}")
    return ""


def _limit(value: str) -> str:
    # A word, not an empty value: click reads an empty environment variable as unset.
    return "" if value.strip().lower() in ("", "none") else value


def settings_from_flags(scrape_interval: str, flags: dict[str, Any]) -> KubernetesSettings:
    """KubernetesSettings from render's flags; every problem at once in a KubernetesSettingsError."""
    problems: list[str] = []
    prometheus_labels = _pairs(flags["prometheus_labels"], "K8S_PROMETHEUS_LABELS", problems)
    dashboard_label = _pairs([flags["dashboard_label"]], "K8S_DASHBOARD_LABEL", problems) or (("", ""),)
    queues = _pairs(flags["scale_queues"], "K8S_SCALE_QUEUES", problems)
    config = _config_text(flags["sidecar_config"], problems)
    monitoring = flags["monitoring_namespace"]
    try:
        settings = KubernetesSettings(
            scrape_interval=scrape_interval, namespace=flags["namespace"], name=flags["name"], image=flags["image"],
            secret_name=flags["secret_name"], broker_tls_secret=flags["broker_tls_secret"], sidecar_config=config,
            monitor=flags["monitor"],
            prometheus_labels=prometheus_labels, dashboard_label=dashboard_label[0],
            dashboard_folder_annotation=flags["dashboard_folder_annotation"],
            dashboard_folder=flags["dashboard_folder"], dashboard_namespace=flags["dashboard_namespace"],
            ha=flags["ha"], network_policy=flags["network_policy"], monitoring_namespace=monitoring,
            scaling=Scaling(queues=queues, min_replicas=flags["scale_min_replicas"],
                            max_replicas=flags["scale_max_replicas"],
                            fallback_replicas=flags["scale_fallback_replicas"],
                            prometheus_url=flags["scale_prometheus_url"]
                            or f"http://prometheus-operated.{monitoring}.svc:9090"),
            resources=Resources(cpu_request=flags["cpu_request"], cpu_limit=_limit(flags["cpu_limit"]),
                                memory_request=flags["memory_request"], memory_limit=_limit(flags["memory_limit"])),
        )
    except KubernetesSettingsError as exc:
        # A variable whose value did not parse is not reported a second time as invalid.
        reported = {problem.split(":", 1)[0] for problem in problems}
        raise KubernetesSettingsError(*problems, *(p for p in exc.problems
                                                   if p.split(":", 1)[0] not in reported)) from None
    if problems:
        raise KubernetesSettingsError(*problems)
    return settings
