"""The Kubernetes objects `render --kubernetes` writes, as plain dicts built from the settings.

The container runs as the Dockerfile and the README describe it: ``celery-sidecar run``,
configured only by environment variables, with sidecar.yml in /etc/celery-sidecar (a
directory mount, as in the compose file) and the alert outbox's state in
/var/lib/celery-sidecar. The paths and the port are those of the image and the compose
file; tests/test_kubernetes.py holds them to it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from celery_sidecar import resources

if TYPE_CHECKING:
    from celery_sidecar.kubernetes import KubernetesSettings

Obj = dict[str, Any]

CONTAINER = "sidecar"
COMMAND = ["celery-sidecar", "run"]  # the Dockerfile's CMD
PORT = 9808  # the Dockerfile's SIDECAR_PORT and EXPOSE
PORT_NAME = "metrics"
UID = 10001  # the Dockerfile's USER
CONFIG_DIR = "/etc/celery-sidecar"
CONFIG_KEY = "sidecar.yml"
STATE_DIR = "/var/lib/celery-sidecar"
TMP_DIR = "/tmp"  # the image's WORKDIR: the only other path the process may write
# The sidecar's own settings, one Secret key each; only the broker is required.
SECRET_KEYS = {"CELERY_BROKER_URL": False, "SLACK_WEBHOOK_URL": True, "SLACK_BOT_TOKEN": True,
               "SLACK_CHANNEL": True, "SIDECAR_BROKER_USE_SSL": True}
# --broker-tls-secret: the broker's CA and client certificate and key, as files, for the
# SIDECAR_BROKER_USE_SSL key's JSON to name (docs/kubernetes.md, "A broker behind TLS").
BROKER_TLS_DIR = "/etc/celery-sidecar-tls"
BROKER_TLS_MODE = 0o440  # read by the sidecar's group (fsGroup), by nobody else
# What the queue-scaling trigger reads: how many workers each queue needs.
WORKERS_DESIRED = "celery_queue_workers_desired"
MAX_NAME = 63  # a label value: KEDA labels the HPA it makes with the ScaledObject's name


def labels(s: KubernetesSettings) -> dict[str, str]:
    return {"app.kubernetes.io/name": "celery-sidecar", "app.kubernetes.io/instance": s.name}


def metadata(s: KubernetesSettings, name: str, *, namespace: str | None = None,
             extra_labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace or s.namespace, "labels": {**labels(s), **(extra_labels or {})}}
    if annotations:
        meta["annotations"] = annotations
    return meta


def config_map(s: KubernetesSettings) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(s, s.config_map_name),
            "data": {CONFIG_KEY: s.sidecar_config}}


def _env(s: KubernetesSettings) -> list[Obj]:
    plain = [
        # 0.0.0.0: the kubelet's probes and Prometheus reach the pod's IP, not its loopback.
        {"name": "SIDECAR_BIND", "value": "0.0.0.0"},
        {"name": "SIDECAR_PORT", "value": str(PORT)},
        {"name": "SIDECAR_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "SIDECAR_STATE_DIR", "value": STATE_DIR},
    ]
    secret = [{"name": key, "valueFrom": {"secretKeyRef": {"name": s.secret_name, "key": key, "optional": optional}}}
              for key, optional in SECRET_KEYS.items()]
    return plain + secret


def _probe(period: int, timeout: int, failures: int) -> Obj:
    return {"httpGet": {"path": "/health", "port": PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def _resources(s: KubernetesSettings) -> Obj:
    r = s.resources
    limits = {k: v for k, v in (("cpu", r.cpu_limit), ("memory", r.memory_limit)) if v}
    requests = {k: v for k, v in (("cpu", r.cpu_request), ("memory", r.memory_request)) if v}
    return {key: value for key, value in (("limits", limits), ("requests", requests)) if value}


def _container(s: KubernetesSettings) -> Obj:
    return {
        "name": CONTAINER,
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": COMMAND,
        "env": _env(s),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        # /health is 503 while the broker is unreachable: the pod leaves the rollout's ready count,
        # but is restarted only after 5 minutes of it, since the sidecar reconnects on its own and
        # a restart would only forget what it holds in memory. A hung process fails it too.
        "readinessProbe": _probe(period=10, timeout=5, failures=3),
        "livenessProbe": _probe(period=30, timeout=10, failures=10),
        "resources": _resources(s),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            # The ConfigMap's directory, never a subPath: the kubelet updates a directory mount by
            # swapping its ..data symlink, and the hot reload follows it; a subPath never changes.
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "tmp", "mountPath": TMP_DIR},
            *([{"name": "broker-tls", "mountPath": BROKER_TLS_DIR, "readOnly": True}] if s.broker_tls_secret else []),
        ],
    }


def _anti_affinity(s: KubernetesSettings) -> Obj:
    term = {"labelSelector": {"matchLabels": labels(s)}, "topologyKey": "kubernetes.io/hostname"}
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": term}]}}


def deployment(s: KubernetesSettings) -> Obj:
    pod: Obj = {
        "automountServiceAccountToken": False,  # the sidecar never calls the Kubernetes API
        # Service links would add an env var per Service in the namespace; one named "sidecar"
        # would set SIDECAR_PORT=tcp://... for every variable not given explicitly.
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(s)],
        "volumes": [
            {"name": "config", "configMap": {"name": s.config_map_name}},
            # The sqlite outbox (non-Redis brokers): kept across container restarts, not pod moves.
            {"name": "state", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
            *([{"name": "broker-tls", "secret": {"secretName": s.broker_tls_secret, "defaultMode": BROKER_TLS_MODE}}]
              if s.broker_tls_secret else []),
        ],
    }
    if s.ha:
        pod["affinity"] = _anti_affinity(s)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(s, s.name),
        "spec": {
            "replicas": 2 if s.ha else 1,
            "selector": {"matchLabels": labels(s)},
            "template": {"metadata": {"labels": labels(s)}, "spec": pod},
        },
    }


def service(s: KubernetesSettings) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata(s, s.name),
        "spec": {
            "type": "ClusterIP",
            "selector": labels(s),
            "ports": [{"name": PORT_NAME, "port": PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
            # A sidecar that cannot reach the broker is not ready, and that is when its metrics
            # matter most: a scrape config that keeps only ready endpoints must still see it.
            "publishNotReadyAddresses": True,
        },
    }


def monitor(s: KubernetesSettings) -> Obj:
    """The ServiceMonitor (or PodMonitor) that has Prometheus scrape /metrics."""
    endpoint = {"port": PORT_NAME, "path": "/metrics", "interval": s.scrape_interval}
    meta = metadata(s, s.name, extra_labels=dict(s.prometheus_labels))
    if s.monitor == "pod":
        spec: Obj = {"selector": {"matchLabels": labels(s)}, "podMetricsEndpoints": [endpoint]}
        return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta, "spec": spec}
    spec = {"selector": {"matchLabels": labels(s)}, "endpoints": [endpoint]}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta, "spec": spec}


def prometheus_rule(s: KubernetesSettings, rules: Obj) -> Obj:
    """``rules``: the parsed rules file (alerts/prometheus/rules.yml, links already pointed)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": metadata(s, s.name, extra_labels=dict(s.prometheus_labels)),
            "spec": {"groups": rules["groups"]}}


def dashboards(s: KubernetesSettings) -> list[tuple[str, Obj]]:
    """(file stem, ConfigMap) per dashboard: the JSON the compose stack provisions, byte for byte."""
    found = []
    for rel, file in resources.walk(resources.GRAFANA_DASHBOARDS):
        if not rel.endswith(".json"):
            continue
        stem = rel.removesuffix(".json")
        key, value = s.dashboard_label
        meta = metadata(s, f"{s.name}-dashboard-{stem}", namespace=s.dashboard_namespace or s.namespace,
                        extra_labels={key: value},
                        annotations={s.dashboard_folder_annotation: s.dashboard_folder})
        found.append((stem, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                             "data": {rel: file.read_text(encoding="utf-8")}}))
    return found


def network_policy(s: KubernetesSettings) -> Obj:
    # Only ingress: the sidecar connects out to the broker and Slack. The kubelet's probes come
    # from the node, which a NetworkPolicy does not block.
    source = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": s.monitoring_namespace}}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata(s, s.name),
            "spec": {"podSelector": {"matchLabels": labels(s)}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [source], "ports": [{"port": PORT_NAME, "protocol": "TCP"}]}]}}


def pod_disruption_budget(s: KubernetesSettings) -> Obj:
    spec = {"minAvailable": 1, "selector": {"matchLabels": labels(s)},
            # Pods that are not ready (a broker outage makes them all so) must not block a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(s, s.name),
            "spec": spec}


def queue_slug(queue: str, room: int) -> str:
    """A DNS label part for a queue name, at most ``room`` long; a hash keeps apart the names
    that had to be changed to fit (``a.b`` and ``a_b``)."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", queue.lower())).strip("-")
    if slug == queue and len(slug) <= room:
        return slug
    digest = hashlib.sha256(queue.encode()).hexdigest()[:6]
    return f"{slug[:room - 7].rstrip('-')}-{digest}".lstrip("-")


def promql_string(value: str) -> str:
    return json.dumps(value)  # PromQL strings take Go's escapes; JSON's are a subset of them


def workers_query(s: KubernetesSettings, queue: str) -> str:
    # max, not sum: with two sidecars (HA) each exports the same reading of the same queue.
    return (f"max({WORKERS_DESIRED}{{namespace={promql_string(s.namespace)},"
            f"queue_name={promql_string(queue)}}})")


def scaled_objects(s: KubernetesSettings) -> list[tuple[str, Obj]]:
    """(name suffix, ScaledObject) per queue: its worker Deployment follows the workers it needs."""
    scale = s.scaling
    found = []
    for queue, deployment_name in scale.queues:
        slug = queue_slug(queue, MAX_NAME - len(s.name) - 1)
        trigger = {
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": scale.prometheus_url,
                "query": workers_query(s, queue),
                "threshold": "1",  # the query is already a number of workers: one replica each
                # No result (no sidecar, no scrape) is an error, so that the fallback applies,
                # rather than 0, which would scale the workers down.
                "ignoreNullValues": "false",
            },
        }
        spec = {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name},
            "minReplicaCount": scale.min_replicas,
            "maxReplicaCount": scale.max_replicas,
            "fallback": {"failureThreshold": 3, "replicas": scale.fallback},
            "triggers": [trigger],
        }
        meta = metadata(s, f"{s.name}-{slug}", annotations={"celery-sidecar/queue": queue})
        found.append((slug, {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": meta,
                             "spec": spec}))
    return found
