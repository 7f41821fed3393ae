"""`celery-sidecar render --kubernetes`: the manifests are valid Kubernetes objects, hold what
the compose stack runs (the same rules, dashboards, command, env and paths) and nothing secret.

Kubernetes' own kinds are checked against its OpenAPI schemas (kubernetes-validate); the
Prometheus Operator's and KEDA's, and everything that starts a process, are in
tests/test_kubernetes_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from celery_sidecar import resources
from tests.support.kubelet import ConfigMapVolume
from tests.support.manifests import (
    ALL_OPTIONS,
    ANNOTATIONS_LIMIT,
    LOADER,
    annotations_after_apply,
    load,
    one,
    render,
    rendered_with,
)
from tests.support.paths import SOURCE

# The oldest release where every field used is GA (a PDB's unhealthyPodEvictionPolicy: 1.31),
# and the newest one kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
CRD_GROUPS = ("monitoring.coreos.com", "keda.sh")
SECRETS = {"CELERY_BROKER_URL": "redis://:broker-pa55@redis:6379/0",
           "SLACK_WEBHOOK_URL": "https://slack.invalid/webhook/not-a-real-secret",
           "SLACK_BOT_TOKEN": "fake-bot-token-not-a-real-secret"}


@pytest.fixture(params=[(), ALL_OPTIONS], ids=["defaults", "all-options"])
def rendered(request, tmp_path: Path) -> Path:
    return rendered_with(tmp_path, *request.param)


# -- valid objects ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_openapi_schemas(rendered: Path, version: str):
    objects = load(rendered)
    for name, obj in objects.items():
        checked = obj
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            # No Kubernetes schema has their spec (the npm models check it, e2e): their metadata
            # is Kubernetes' ObjectMeta all the same.
            checked = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        try:
            kubernetes_validate.validate(checked, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is not a valid {obj['kind']} for Kubernetes {version}: {exc}", pytrace=False)
    kinds = {o["kind"] for o in objects.values()}
    assert {"ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule"} <= kinds


def test_the_schema_check_catches_a_wrong_field(tmp_path: Path):
    deployment = yaml.safe_load((rendered_with(tmp_path) / "deployment.yaml").read_text())
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment["spec"]["replicas"] = 1
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_file_and_the_same_inputs_write_the_same_bytes(tmp_path: Path):
    first = rendered_with(tmp_path / "a", *ALL_OPTIONS)
    second = rendered_with(tmp_path / "b", *ALL_OPTIONS)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    kustomization = yaml.safe_load((first / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(set(files) - {"kustomization.yaml"})
    names = [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in load(first).values()]
    assert len(names) == len(set(names)), names


def test_libyaml_and_pure_python_yaml_write_the_same_bytes(tmp_path: Path):
    """Whether PyYAML was built with libyaml or not, the same inputs give the same files."""
    from celery_sidecar.kubernetes import PythonDumper, dump

    for path in rendered_with(tmp_path, *ALL_OPTIONS).iterdir():
        text = path.read_text(encoding="utf-8")
        assert dump(yaml.load(text, Loader=LOADER), PythonDumper) == text, path.name


def test_nothing_secret_is_rendered_and_the_secret_is_only_referenced(tmp_path: Path):
    out = tmp_path / "out"
    result = render(out, *ALL_OPTIONS, "--secret-name", "shop-sidecar", env=SECRETS)
    assert result.exit_code == 0, result.output
    for path in out.iterdir():
        text = path.read_text()
        for secret in SECRETS.values():
            assert secret not in text, (path.name, secret)
    objects = load(out)
    assert "Secret" not in {o["kind"] for o in objects.values()}
    env = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert set(refs) == {"CELERY_BROKER_URL", "SLACK_WEBHOOK_URL", "SLACK_BOT_TOKEN", "SLACK_CHANNEL",
                         "SIDECAR_BROKER_USE_SSL"}
    assert {r["name"] for r in refs.values()} == {"shop-sidecar"}
    assert all(r["key"] == name for name, r in refs.items())
    assert refs["CELERY_BROKER_URL"]["optional"] is False
    assert all(r["optional"] for name, r in refs.items() if name != "CELERY_BROKER_URL")


# -- the same container as the image and the compose stack --------------------------------------


def dockerfile_cmd() -> list[str]:
    text = (SOURCE / "Dockerfile").read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.MULTILINE)
    return json.loads(cmd)


def test_the_container_is_the_image_as_the_dockerfile_readme_and_compose_run_it(rendered: Path):
    objects = load(rendered)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    dockerfile = (SOURCE / "Dockerfile").read_text()
    compose = yaml.safe_load((SOURCE / "docker-compose.monitoring.yml").read_text())["services"]["sidecar"]
    readme = (SOURCE / "README.md").read_text()

    assert container["command"] == dockerfile_cmd() == compose["command"]
    assert "args" not in container
    uid = int(re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE).group(1))
    assert pod["securityContext"]["runAsUser"] == container["securityContext"]["runAsUser"] == uid
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in env:
        assert f"`{name}`" in readme, f"{name} is not in the README's table of flags and environment variables"
    assert env["SIDECAR_BIND"] == "0.0.0.0", "probes and scrapes reach the pod's IP, not its loopback"
    port = int(env["SIDECAR_PORT"])
    assert re.search(rf"^EXPOSE {port}$", dockerfile, re.MULTILINE)
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = Path(env["SIDECAR_CONFIG"])
    assert str(config) == compose["environment"]["SIDECAR_CONFIG"].split(":-", 1)[1].rstrip("}")
    assert f"{config.parent}:ro" in " ".join(compose["volumes"]), "the directory compose mounts the config in"
    config_mount = mounts[str(config.parent)]
    assert "subPath" not in config_mount, "a subPath mount never sees the kubelet's updates"
    assert config_mount["readOnly"] is True
    config_map = one({k: v for k, v in objects.items() if k == "sidecar-config.yaml"}, "ConfigMap")
    assert volumes[config_mount["name"]]["configMap"] == {"name": config_map["metadata"]["name"]}
    assert list(config_map["data"]) == [config.name]
    assert env["SIDECAR_STATE_DIR"] == compose["environment"]["SIDECAR_STATE_DIR"]
    assert "emptyDir" in volumes[mounts[env["SIDECAR_STATE_DIR"]]["name"]]
    # The root filesystem is read-only: the image's WORKDIR is the one other writable path.
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.MULTILINE)[-1]
    assert "emptyDir" in volumes[mounts[workdir]["name"]]


def test_the_pod_runs_locked_down_with_probes_and_resources(rendered: Path):
    pod = one(load(rendered), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "metrics"}, probe
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 300, \
        "a broker outage (503) restarts the sidecar only after minutes: it reconnects on its own"
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                      "limits": {"cpu": "1", "memory": "1Gi"}}


def test_the_config_map_holds_the_default_config_or_the_given_file(tmp_path: Path):
    default = rendered_with(tmp_path / "default")
    data = yaml.safe_load((default / "sidecar-config.yaml").read_text())["data"]
    assert data == {"sidecar.yml": resources.read_text(resources.DEFAULT_CONFIG)}

    given = tmp_path / "mine.yml"
    given.write_text("# ours\nthresholds:\n  worker_cpu_percent: 55\n")
    out = rendered_with(tmp_path / "given", "--sidecar-config", str(given))
    assert yaml.safe_load((out / "sidecar-config.yaml").read_text())["data"] == {"sidecar.yml": given.read_text()}

    given.write_text("thresholds:\n  worker_cpu_percent: lots\n")
    refused = render(tmp_path / "bad", "--sidecar-config", str(given))
    assert refused.exit_code == 2 and "K8S_SIDECAR_CONFIG" in refused.output and "worker_cpu_percent" in \
        refused.output, refused.output
    assert not (tmp_path / "bad").exists()


# -- Prometheus Operator and Grafana ------------------------------------------------------------


def test_the_prometheus_rule_is_rules_yml_with_its_links_on_the_grafana_url(tmp_path: Path):
    out = rendered_with(tmp_path, "--grafana-url", "https://ops.example.com/grafana/",
                        "--prometheus-label", "release=kube-prometheus-stack")
    rule = one(load(out), "PrometheusRule")
    shipped = resources.read_text(resources.RULES).replace("__GRAFANA_URL__", "https://ops.example.com/grafana")
    assert rule["spec"]["groups"] == yaml.safe_load(shipped)["groups"]
    assert "__GRAFANA_URL__" not in (out / "prometheusrule.yaml").read_text()
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("kind", ["service", "pod"])
def test_the_monitor_scrapes_the_sidecar_and_carries_the_given_labels(tmp_path: Path, kind: str):
    out = rendered_with(tmp_path, "--monitor", kind, "--prometheus-label", "release=kps", "--scrape-interval", "30s")
    objects = load(out)
    monitor = one(objects, f"{kind.capitalize()}Monitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = monitor["spec"]["endpoints" if kind == "service" else "podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s"}
    target = one(objects, "Service" if kind == "service" else "Deployment")
    selected = target["metadata"]["labels"] if kind == "service" else target["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= selected.items()
    assert f"{kind}monitor.yaml" in yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]


def test_each_dashboard_is_the_provisioned_json_in_a_configmap_under_the_apply_limit(rendered: Path):
    shipped = {rel: f.read_text(encoding="utf-8") for rel, f in resources.walk(resources.GRAFANA_DASHBOARDS)
               if rel.endswith(".json")}
    found = {}
    for obj in load(rendered).values():
        if obj["kind"] == "ConfigMap" and "grafana_dashboard" in obj["metadata"]["labels"]:
            assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert obj["metadata"]["annotations"] == {"grafana_folder": "Celery"}
            size = annotations_after_apply(obj)
            assert size < ANNOTATIONS_LIMIT, f"{obj['metadata']['name']}: {size} bytes of annotations after apply"
            found.update(obj["data"])
    assert found == shipped
    assert all(json.loads(found[name]) == json.loads(text) for name, text in shipped.items())


def test_the_apply_limit_check_catches_a_dashboard_too_large():
    big = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
           "data": {"d.json": json.dumps({"panels": [{"expr": "a > b & c"}] * 8000})}}
    assert annotations_after_apply(big) > ANNOTATIONS_LIMIT


def test_the_dashboard_label_folder_and_namespace_are_configurable(tmp_path: Path):
    out = rendered_with(tmp_path, "--dashboard-label", "team-dashboards=yes", "--dashboard-folder", "Queues",
                        "--dashboard-folder-annotation", "k8s-sidecar-target-directory",
                        "--dashboard-namespace", "grafana")
    boards = [o for o in load(out).values() if o["kind"] == "ConfigMap" and "sidecar.yml" not in o["data"]]
    assert len(boards) == len([r for r, _ in resources.walk(resources.GRAFANA_DASHBOARDS) if r.endswith(".json")])
    assert len(boards) >= 2
    for board in boards:
        assert board["metadata"]["labels"]["team-dashboards"] == "yes"
        assert board["metadata"]["annotations"] == {"k8s-sidecar-target-directory": "Queues"}
        assert board["metadata"]["namespace"] == "grafana"


# -- the tests' stand-in for the kubelet (tests/test_kubernetes_e2e.py runs a sidecar on it) ---


def test_the_kubelet_swap_lays_out_a_configmap_volume_as_the_kubelet_does(tmp_path: Path):
    volume = ConfigMapVolume(tmp_path / "vol", {"sidecar.yml": "a: 1\n"})
    first = volume.current
    assert first == "..2026_01_01_00_00_00.123"
    assert os.readlink(tmp_path / "vol" / "sidecar.yml") == "..data/sidecar.yml"
    volume.update({"sidecar.yml": "a: 2\n"})
    assert volume.current == "..2026_01_01_00_00_01.246"
    assert sorted(p.name for p in (tmp_path / "vol").iterdir()) == ["..2026_01_01_00_00_01.246", "..data",
                                                                     "sidecar.yml"]
    assert (tmp_path / "vol" / "sidecar.yml").read_text() == "a: 2\n"
