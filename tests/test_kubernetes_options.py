"""`render --kubernetes`'s optional objects (HA, NetworkPolicy, KEDA), its flags and their
environment variables, and what it refuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from celery_sidecar.render_cli import render_command
from tests.support.manifests import load, one, render, rendered_with
from tests.support.paths import SOURCE

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def pod_labels(objects: dict) -> dict[str, str]:
    return one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]


def test_ha_runs_two_replicas_spread_over_nodes_with_a_disruption_budget(tmp_path: Path):
    plain = load(rendered_with(tmp_path / "one"))
    assert one(plain, "Deployment")["spec"]["replicas"] == 1
    assert "PodDisruptionBudget" not in {o["kind"] for o in plain.values()}

    objects = load(rendered_with(tmp_path / "ha", "--ha"))
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    budget = one(objects, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels(objects).items()
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels(objects).items()


def test_the_network_policy_admits_only_the_monitoring_namespace_to_the_metrics_port(tmp_path: Path):
    objects = load(rendered_with(tmp_path, "--network-policy", "--monitoring-namespace", "observability"))
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(objects).items()
    assert policy["policyTypes"] == ["Ingress"], "egress (broker, Slack) stays open"
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_one_scaled_object_per_queue_scales_its_worker_deployment_on_the_max_across_sidecars(tmp_path: Path):
    out = rendered_with(tmp_path, "--namespace", "shop", "--scale-queue", "celery=worker",
                        "--scale-queue", 'Reports.Heavy"Q\\=report-worker', "--scale-min-replicas", "2",
                        "--scale-max-replicas", "30", "--monitoring-namespace", "obs")
    scaled = {o["metadata"]["annotations"]["celery-sidecar/queue"]: o
              for o in load(out).values() if o["kind"] == "ScaledObject"}
    assert set(scaled) == {"celery", 'Reports.Heavy"Q\\'}
    assert [o["spec"]["scaleTargetRef"] for o in scaled.values()] == [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"},
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "report-worker"}]
    for queue, obj in scaled.items():
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and DNS_LABEL.match(name), name
        spec = obj["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 30)
        assert spec["fallback"] == {"failureThreshold": 3, "replicas": 30}
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        assert meta["serverAddress"] == "http://prometheus-operated.obs.svc:9090"
        assert meta["threshold"] == "1" and meta["ignoreNullValues"] == "false"
        query = re.fullmatch(r'max\(celery_queue_workers_desired\{namespace="shop",queue_name=("(?:[^"\\]|\\.)*")\}\)',
                             meta["query"])
        assert query, meta["query"]
        assert json.loads(query.group(1)) == queue, "the queue name, escaped as a PromQL string"
    assert scaled["celery"]["metadata"]["name"] == "celery-sidecar-celery"
    listed = yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]
    assert {f for f in listed if f.startswith("scaledobject-")} == {
        f"scaledobject-{o['metadata']['name'].removeprefix('celery-sidecar-')}.yaml" for o in scaled.values()}


def test_queues_whose_names_differ_only_in_punctuation_get_distinct_objects(tmp_path: Path):
    out = rendered_with(tmp_path, "--scale-queue", "a.b=w1", "--scale-queue", "a_b=w2",
                        "--scale-queue", f"{'q' * 80}=w3", "--scale-fallback-replicas", "4")
    names = [o["metadata"]["name"] for o in load(out).values() if o["kind"] == "ScaledObject"]
    assert len(set(names)) == 3 and all(len(n) <= 63 and DNS_LABEL.match(n) for n in names), names
    assert {o["spec"]["fallback"]["replicas"] for o in load(out).values() if o["kind"] == "ScaledObject"} == {4}


def test_a_broker_tls_secret_is_mounted_read_only_for_the_sidecar_alone(tmp_path: Path):
    def pod(*args: str) -> dict:
        return one(load(rendered_with(tmp_path / "-".join(args or ("none",)), *args)),
                   "Deployment")["spec"]["template"]["spec"]

    plain = pod()
    assert "broker-tls" not in {v["name"] for v in plain["volumes"]}
    assert "broker-tls" not in {m["name"] for m in plain["containers"][0]["volumeMounts"]}
    tls = pod("--broker-tls-secret", "shop-broker-tls")
    assert {"name": "broker-tls", "secret": {"secretName": "shop-broker-tls", "defaultMode": 0o440}} in tls["volumes"]
    mounts = tls["containers"][0]["volumeMounts"]
    assert {"name": "broker-tls", "mountPath": "/etc/celery-sidecar-tls", "readOnly": True} in mounts
    assert tls["securityContext"]["fsGroup"] == tls["securityContext"]["runAsGroup"], "0440: the group reads"
    # The JSON naming the files is a key of the main Secret, optional like Slack's.
    env = tls["containers"][0]["env"]
    [ref] = [e["valueFrom"]["secretKeyRef"] for e in env if e["name"] == "SIDECAR_BROKER_USE_SSL"]
    assert ref == {"name": "celery-sidecar", "key": "SIDECAR_BROKER_USE_SSL", "optional": True}


def test_every_kubernetes_flag_reads_an_environment_variable(tmp_path: Path):
    options = {p.name: p for p in render_command.params}
    for name in ("manifests", "namespace", "name", "image", "secret_name", "broker_tls_secret", "sidecar_config",
                 "monitor",
                 "prometheus_labels", "dashboard_label", "dashboard_folder_annotation", "dashboard_folder",
                 "dashboard_namespace", "ha", "network_policy", "monitoring_namespace", "scale_queues",
                 "scale_min_replicas", "scale_max_replicas", "scale_fallback_replicas", "scale_prometheus_url",
                 "cpu_request", "cpu_limit", "memory_request", "memory_limit"):
        assert options[name].envvar, name
    env = {"RENDER_KUBERNETES": "true", "K8S_NAMESPACE": "shop", "K8S_NAME": "shop-sidecar",
           "SIDECAR_IMAGE": "registry.example.com/celery-sidecar:1.2", "K8S_HA": "true",
           "K8S_PROMETHEUS_LABELS": "release=kps team=ops", "K8S_SCALE_QUEUES": "celery=worker bulk=bulk-worker",
           "K8S_MEMORY_LIMIT": "none", "K8S_MONITOR": "pod", "GRAFANA_ROOT_URL": "https://ops.example.com/grafana"}
    out = tmp_path / "out"
    result = CliRunner().invoke(render_command, ["--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    objects = load(out)
    deployment = one(objects, "Deployment")
    assert deployment["metadata"] == {"name": "shop-sidecar", "namespace": "shop",
                                      "labels": {"app.kubernetes.io/name": "celery-sidecar",
                                                 "app.kubernetes.io/instance": "shop-sidecar"}}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/celery-sidecar:1.2"
    assert container["resources"]["limits"] == {"cpu": "1"}, "an empty limit is no limit"
    assert deployment["spec"]["replicas"] == 2
    assert {"release": "kps", "team": "ops"}.items() <= one(objects, "PodMonitor")["metadata"]["labels"].items()
    assert len([o for o in objects.values() if o["kind"] == "ScaledObject"]) == 2
    assert "https://ops.example.com/grafana/d/" in (out / "prometheusrule.yaml").read_text()


def test_the_manifests_need_none_of_the_compose_settings_and_say_when_one_is_given(tmp_path: Path, caplog):
    """The compose stack's required settings (ALLOW_CIDRS, FLOWER_*) are not asked for."""
    result = render(tmp_path / "k8s", "--allow-cidrs", "10.0.0.0/8")
    assert result.exit_code == 0, result.output
    assert "render --kubernetes ignores the compose stack's --allow-cidrs" in caplog.text
    assert not (tmp_path / "k8s" / "nginx").exists()


@pytest.mark.parametrize(("args", "says"), [
    (("--namespace", "Shop_1"), "K8S_NAMESPACE: 'Shop_1' is not a namespace name"),
    (("--name", "9sidecar"), "K8S_NAME: '9sidecar' must start with a letter"),
    (("--prometheus-label", "release"), "K8S_PROMETHEUS_LABELS: 'release' is not KEY=VALUE"),
    (("--prometheus-label", "release=a b"), "K8S_PROMETHEUS_LABELS: release='a b': the value is not a label value"),
    (("--dashboard-label", "bad key=1"), "K8S_DASHBOARD_LABEL: 'bad key' is not a label key"),
    (("--cpu-request", "2", "--cpu-limit", "500m"), "K8S_CPU_REQUEST: 2 is more than K8S_CPU_LIMIT 500m"),
    (("--memory-limit", "lots"), "K8S_MEMORY_LIMIT: 'lots' is not a quantity"),
    (("--scale-queue", "a=w", "--scale-queue", "b=w"), "queues 'a' and 'b' both scale Deployment 'w'"),
    (("--scale-queue", "a=Worker"), "'Worker' (for queue 'a') is not a Deployment name"),
    (("--scale-min-replicas", "5", "--scale-max-replicas", "2"), "must be 0 <= min <= max"),
    (("--scale-queue", "a=w", "--scale-prometheus-url", "prometheus:9090"), "K8S_SCALE_PROMETHEUS_URL"),
    (("--grafana-url", "%(protocol)s://x/grafana"), "GRAFANA_ROOT_URL"),
    (("--scrape-interval", "often"), "SCRAPE_INTERVAL: 'often' is not a duration"),
    (("--broker-tls-secret", "Broker TLS"), "K8S_BROKER_TLS_SECRET: 'Broker TLS' is not a Secret name"),
])
def test_a_setting_the_manifests_cannot_take_is_refused_and_nothing_is_written(tmp_path: Path, args, says):
    result = render(tmp_path / "out", *args)
    assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_every_refused_setting_is_named_at_once(tmp_path: Path):
    result = render(tmp_path / "out", "--namespace", "A", "--name", "B", "--prometheus-label", "x",
                    "--dashboard-label", "y", "--memory-request", "9Gi")
    assert result.exit_code == 2
    assert "5 settings are missing or invalid" in result.output, result.output
    assert result.output.count("K8S_DASHBOARD_LABEL") == 1, "a value that did not parse is named once"


# -- docs/kubernetes.md -------------------------------------------------------------------------


def test_the_doc_lists_every_kubernetes_flag_with_its_environment_variable():
    doc = (SOURCE / "docs" / "kubernetes.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `--")]
    from celery_sidecar.kubernetes import KUBERNETES_FLAGS

    params = {p.name: p for p in render_command.params}
    for name in ("manifests", *KUBERNETES_FLAGS):
        flag, env = params[name].opts[0], params[name].envvar
        assert any(f"`{flag}`" in row and f"`{env}`" in row for row in rows), (flag, env)


def pointer(obj, path: str):
    """What a JSON patch path points at in ``obj`` (KeyError, IndexError when nothing)."""
    for part in path.strip("/").split("/"):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def test_the_docs_kustomize_overlay_names_what_render_writes(tmp_path: Path):
    doc = (SOURCE / "docs" / "kubernetes.md").read_text()
    section = doc.split("## Customising with kustomize", 1)[1]
    overlay = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))
    objects = load(rendered_with(tmp_path))
    image = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert [i["name"] for i in overlay["images"]] == [image.split(":")[0]]
    for patch in overlay["patches"]:
        target = next(o for o in objects.values() if o["kind"] == patch["target"]["kind"]
                      and o["metadata"]["name"] == patch["target"]["name"])
        for op in yaml.safe_load(patch["patch"]):
            pointer(target, op["path"])  # a replace needs the path to exist
