"""The Kubernetes manifests against real things: the Prometheus Operator's and KEDA's own models
(on Node.js), and a real sidecar process on a real redis-server started as the Deployment
says, with its ConfigMap laid out and updated as the kubelet does it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.kubelet import ConfigMapVolume
from tests.support.manifests import ALL_OPTIONS, load, one, rendered_with
from tests.support.paths import SUITE, child_env
from tests.support.procs import Metrics, Process, SidecarProcess
from tests.support.redis_production import tls_redis
from tests.support.servers import free_port, wait_for
from tests.support.tls import make_pki

pytestmark = pytest.mark.e2e

# scripts/test installs the models here with npm ci, from tests/support/npm's lock file.
NPM = Path(os.environ.get("SIDECAR_TEST_NPM") or "/tmp/celery-sidecar-test/npm")
MODELS_SCRIPT = SUITE / "tests" / "support" / "k8s_models.mjs"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"}


# -- the Prometheus Operator's and KEDA's models ------------------------------------------------


def validate_with_models(objects: list[dict], tmp_path: Path) -> list[dict]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Prometheus Operator and KEDA models run on Node.js")
    if not (NPM / "node_modules" / "@kubernetes-models").is_dir():
        pytest.fail(f"the @kubernetes-models packages are not in {NPM}: scripts/test installs them "
                    "(npm ci from tests/support/npm)", pytrace=False)
    given = tmp_path / "objects.json"
    given.write_text(json.dumps(objects))
    result = subprocess.run([node, "--input-type=module", "-e", MODELS_SCRIPT.read_text(), str(given)],
                            cwd=NPM, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_operator_and_keda_objects_pass_their_projects_models(tmp_path: Path):
    renders = (ALL_OPTIONS, ("--monitor", "pod", "--scale-queue", "celery=worker"))
    objects = [o for n, args in enumerate(renders)
               for o in load(rendered_with(tmp_path / str(n), *args)).values() if o["kind"] in CRD_KINDS]
    assert {o["kind"] for o in objects} == CRD_KINDS
    results = validate_with_models(objects, tmp_path)
    assert [r for r in results if r["error"]] == []
    assert len(results) == len(objects)


def test_the_models_refuse_a_wrong_field(tmp_path: Path):
    objects = {o["kind"]: o for o in load(rendered_with(tmp_path, *ALL_OPTIONS)).values() if o["kind"] in CRD_KINDS}
    objects["ServiceMonitor"]["spec"]["endpoints"][0]["interval"] = 15
    objects["ScaledObject"]["spec"]["minReplicaCount"] = "1"
    objects["PrometheusRule"]["spec"]["groups"][0]["rules"] = "none"
    unknown = {"apiVersion": "monitoring.coreos.com/v1", "kind": "Probe", "metadata": {"name": "x"}}
    results = validate_with_models([*objects.values(), unknown], tmp_path)
    errors = {r["kind"]: r["error"] for r in results}
    assert "interval must be string" in errors["ServiceMonitor"]
    assert "minReplicaCount must be integer" in errors["ScaledObject"]
    assert "rules must be array" in errors["PrometheusRule"]
    assert errors["Probe"] == "no model for monitoring.coreos.com/v1/Probe"


# -- a ConfigMap edit reaches the running sidecar -----------------------------------------------


def config_data(out: Path) -> dict[str, str]:
    return one({k: v for k, v in load(out).items() if k == "sidecar-config.yaml"}, "ConfigMap")["data"]


def latency_threshold(side: SidecarProcess) -> float | None:
    return side.metrics().get("celery_threshold", signal="latency_seconds", level="normal")


def test_a_configmap_edit_reaches_the_sidecar_within_a_second_and_a_bad_one_is_refused(
        redis_srv, sidecar, tmp_path: Path):
    data = config_data(rendered_with(tmp_path))
    volume = ConfigMapVolume(tmp_path / "etc-celery-sidecar", data)
    side = sidecar(redis_srv.url, config=volume.root / "sidecar.yml")
    assert latency_threshold(side) == yaml.safe_load(data["sidecar.yml"])["thresholds"]["latency_seconds"]["normal"]

    edited = yaml.safe_load(data["sidecar.yml"])
    edited["thresholds"]["latency_seconds"]["normal"] = 7.5
    old = volume.current
    volume.update({"sidecar.yml": yaml.safe_dump(edited)})
    swapped = time.monotonic()
    assert volume.current != old and not (volume.root / old).exists()
    wait_for(lambda: latency_threshold(side) == 7.5, timeout=10, interval=0.05, what="the edit to be live")
    # The reloader polls once a second; the rest is this test's own scrapes on a busy machine.
    assert time.monotonic() - swapped < 1.6
    assert side.metrics().get("celery_sidecar_config_valid") == 1

    edited["thresholds"]["worker_cpu_percent"] = "lots"
    edited["thresholds"]["latency_seconds"]["normal"] = 9
    volume.update({"sidecar.yml": yaml.safe_dump(edited)})
    side.wait_metric("celery_sidecar_config_valid", lambda v: v == 0, timeout=10)
    status, health = side.health()
    assert status == 200, "a refused edit keeps the previous config live"
    assert "worker_cpu_percent" in health["config"]["error"], health["config"]
    assert latency_threshold(side) == 7.5, "the previous thresholds stay"


# -- the Deployment's container, run as rendered ------------------------------------------------


def local_mounts(pod: dict, container: dict, objects: dict, root: Path,
                 secret_files: dict[str, dict[str, str]] | None = None) -> dict[str, Path]:
    """Each of the container's mounts as a local directory: ConfigMaps laid out by the kubelet's
    rules, Secrets from ``secret_files`` (Secret name -> key -> the file with its value) with
    the volume's mode, emptyDirs empty. mountPath -> directory."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_maps = {o["metadata"]["name"]: o for o in objects.values() if o["kind"] == "ConfigMap"}
    mapped = {}
    for mount in container["volumeMounts"]:
        local = root / mount["mountPath"].strip("/").replace("/", "-")
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            ConfigMapVolume(local, config_maps[volume["configMap"]["name"]]["data"])
        elif "secret" in volume:
            local.mkdir(parents=True)
            for key, source in (secret_files or {})[volume["secret"]["secretName"]].items():
                (local / key).write_bytes(Path(source).read_bytes())
                (local / key).chmod(volume["secret"]["defaultMode"])
        else:
            assert set(volume) == {"name", "emptyDir"}, volume
            local.mkdir(parents=True)
        mapped[mount["mountPath"]] = local
    return mapped


def local_env(container: dict, mapped: dict[str, Path], secrets: dict[str, str]) -> dict[str, str]:
    """The container's env: paths under a mount moved to its local directory (in a Secret's
    value too: a JSON naming mounted files), each Secret key from ``secrets`` (an optional key
    that is not there sets nothing, as in a pod)."""
    env = {}
    for item in container["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in secrets:  # each JSON string that is a path, once
                env[item["name"]] = re.sub(r'"(/[^"]*)"', lambda m: json.dumps(local_path(m[1], mapped)),
                                           secrets[ref["key"]])
            else:
                assert ref["optional"], f"{ref['key']} is required but the test gives no value"
            continue
        env[item["name"]] = local_path(item["value"], mapped)
    return env


def local_path(value: str, mapped: dict[str, Path]) -> str:
    for mount in sorted(mapped, key=len, reverse=True):  # the innermost mount holds the path
        if value == mount or value.startswith(mount + "/"):
            return str(mapped[mount]) + value[len(mount):]
    return value


def run_as_rendered(container: dict, mapped: dict[str, Path], env: dict[str, str], procs: list) -> tuple[int, dict]:
    """The container's command with its env, on a free loopback port; (the port, its healthy /health)."""
    # Not the rendered port and address: a free loopback port, so that no test shares or exposes it.
    port = free_port()
    env.update(SIDECAR_PORT=str(port), SIDECAR_BIND="127.0.0.1")
    program = Path(sys.executable).parent / container["command"][0]
    assert program.exists(), f"{container['command'][0]} is not installed next to {sys.executable}"
    proc = Process("sidecar-k8s", [str(program), *container["command"][1:], *container.get("args", [])],
                   child_env(**env), cwd=mapped["/tmp"])
    procs.append(proc)

    def healthy() -> dict | None:
        assert proc.proc.poll() is None, f"the sidecar exited:\n{proc.log()[-4000:]}"
        response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        return response.json() if response.status_code == 200 else None

    return port, wait_for(healthy, timeout=30, what="the rendered sidecar's /health")


def test_the_rendered_container_command_and_env_run_a_healthy_sidecar(redis_srv, procs, tmp_path: Path):
    objects = load(rendered_with(tmp_path))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mapped = local_mounts(pod, container, objects, tmp_path / "pod")
    env = local_env(container, mapped, {"CELERY_BROKER_URL": redis_srv.url})
    port, health = run_as_rendered(container, mapped, env, procs)
    assert health["status"] == "ok", health
    assert health["broker"]["connected"] is True
    assert health["config"] == {**health["config"], "path": env["SIDECAR_CONFIG"], "valid": True}
    assert Path(env["SIDECAR_CONFIG"]).parent == mapped["/etc/celery-sidecar"]
    metrics = Metrics(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    assert metrics.get("celery_sidecar_config_valid") == 1


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "stock"])
def test_the_rendered_pod_reads_a_tls_broker_with_the_mounted_client_certificate(fast_path, procs, tmp_path: Path):
    """redis-server requires a client certificate of its CA; the pod has it only through the
    --broker-tls-secret mount and the SIDECAR_BROKER_USE_SSL key naming its files."""
    pki = make_pki(tmp_path / "pki")
    with tls_redis(pki) as (_server, tls_port):
        objects = load(rendered_with(tmp_path, "--broker-tls-secret", "broker-tls"))
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        files = {"broker-tls": {"ca.crt": pki.ca, "tls.crt": pki.client_cert, "tls.key": pki.client_key}}
        mapped = local_mounts(pod, container, objects, tmp_path / "pod", files)
        use_ssl = {"ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/celery-sidecar-tls/ca.crt",
                   "ssl_certfile": "/etc/celery-sidecar-tls/tls.crt", "ssl_keyfile": "/etc/celery-sidecar-tls/tls.key"}
        env = local_env(container, mapped, {"CELERY_BROKER_URL": f"rediss://127.0.0.1:{tls_port}/0",
                                            "SIDECAR_BROKER_USE_SSL": json.dumps(use_ssl)})
        assert mapped["/etc/celery-sidecar-tls"].as_posix() in env["SIDECAR_BROKER_USE_SSL"]
        if not fast_path:
            env["SIDECAR_FAST_PATH"] = "false"
        _port, health = run_as_rendered(container, mapped, env, procs)
        assert health["broker"]["connected"] is True
        assert health["broker"]["intake"] == ("redis-fast" if fast_path else "stock"), health["broker"]
