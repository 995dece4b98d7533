"""deploy/k8s, checked without a cluster: `kubectl kustomize` renders the base and each overlay,
every object validates against the Kubernetes schemas (the ServiceMonitor against the
Prometheus operator's), and the manifests agree with the server they run: its routes, port,
settings, drain, the metric the HPA scales on and the adapter rule that serves it. One slow test
runs the server on the pod's filesystem: the root read-only, only the emptyDir mounts writable."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from observability import DASHBOARD, in_ci
from service_helpers import REPO, ServerProcess
from test_deploy_files import env_of, instructions, stage

from engine.kernels import KERNEL_DIR_ENV
from service.app import create_app
from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings, load_settings

K8S = REPO / "deploy" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
# Each kustomization, and the Dockerfile target its image is built from.
TARGETS = {"base": "cpu", "overlays/cpu": "cpu", "overlays/gpu": "cuda"}
# The oldest Kubernetes the manifests claim (README.md) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor"}        # not in Kubernetes' schemas: checked on their own below
# The image user's home (Dockerfile: useradd --create-home), which the kubelet sets as HOME.
IMAGE_HOME = "/home/attnserve"
# Environment variables the engine reads itself (not flags): engine/kernels.py.
ENGINE_VARIABLES = {KERNEL_DIR_ENV}
# --api-key's other environment form: one key (service/settings.py, load_settings).
API_KEY_VARIABLE = ENV_PREFIX + "API_KEY"


# -- rendering ----------------------------------------------------------------------------------

def require(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"no `{tool}` ({why})"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    return path


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    kubectl = require("kubectl", "kubectl kustomize renders deploy/k8s; CI machines have it")
    done = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(target: str) -> list[dict]:
    return list(_render(target))


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def container(objects: list[dict]) -> dict:
    (found,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def pod_environment(objects: list[dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env
    values (Secret references are optional ones, left out: unset without their Secret)."""
    env = {}
    for source in container(objects).get("envFrom", []):
        env |= one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {v["name"]: v["value"] for v in container(objects).get("env", []) if "value" in v}
    return env


def served_settings(monkeypatch, target: str) -> Settings:
    """Settings as `python -m service` reads them in this pod: the image's ATTNSERVE_* ENV,
    overridden by the pod's environment, then its args."""
    objects = render(target)
    image_env = {k: v for k, v in env_of(stage(TARGETS[target])).items() if k.startswith(ENV_PREFIX)}
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in (image_env | pod_environment(objects)).items():
        monkeypatch.setenv(key, value)
    return load_settings(container(objects).get("args", []))


def prestop_sleep_seconds(objects: list[dict]) -> int:
    command = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def mounted_volume(objects: list[dict], path: str) -> dict:
    """The pod volume whose mount holds `path`."""
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in container(objects)["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume


targets = pytest.mark.parametrize("target", TARGETS)


# -- rendering and schemas ----------------------------------------------------------------------

@targets
def test_kustomize_renders_every_object(target):
    objects = render(target)
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    (settings,) = container(objects)["envFrom"]
    settings_name = settings["configMapRef"]["name"]
    assert re.fullmatch(r"attnserve-[a-z0-9]{10}", settings_name)    # a hash of the settings
    assert names == sorted([
        ("ConfigMap", settings_name), ("ConfigMap", "attnserve-dashboard"), ("Deployment", "attnserve"),
        ("HorizontalPodAutoscaler", "attnserve"), ("PodDisruptionBudget", "attnserve"),
        ("Service", "attnserve"), ("ServiceMonitor", "attnserve")])
    if target.startswith("overlays/"):
        assert {o["metadata"]["namespace"] for o in objects} == {"attnserve"}


@targets
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(target, version):
    for obj in render(target):
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)


@targets
def test_the_service_monitor_validates_against_the_prometheus_operator_schema(target):
    """Against models generated from the operator's CRDs. Pydantic drops fields it does not
    know, so a strict check is that nothing was dropped."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
    monitor = one(render(target), "ServiceMonitor")
    parsed = ServiceMonitor.model_validate(monitor)
    assert parsed.model_dump(by_alias=True, exclude_none=True, mode="json") == monitor


@targets
def test_the_dashboard_config_map_is_generated_from_the_dashboard_file(target):
    dashboard = one(render(target), "ConfigMap", "attnserve-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"    # Grafana's sidecar
    assert dashboard["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    assert not list(K8S.rglob("*.json")), "a copy of the dashboard"


# -- the manifests against the server ----------------------------------------------------------

@targets
def test_probes_and_scrapes_reach_open_routes_on_the_served_port(monkeypatch, target):
    """The app as the pod configures it, with an API key, not started (no model loads):
    /ready and /health answer 503 while loading (not 401, not 404); /metrics is served."""
    objects = render(target)
    settings = served_settings(monkeypatch, target)
    assert settings.host == "0.0.0.0"
    (port,) = container(objects)["ports"]
    assert port == {"name": "http", "containerPort": settings.port}
    probes = {name: container(objects)[name]["httpGet"]
              for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": {"path": "/ready", "port": "http"},
                      "readinessProbe": {"path": "/ready", "port": "http"},
                      "livenessProbe": {"path": "/health", "port": "http"}}
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    (service_port,) = one(objects, "Service")["spec"]["ports"]
    assert service_port["name"] == "http" and service_port["targetPort"] == "http"

    client = TestClient(create_app(settings.model_copy(update={"api_keys": ["k8s-test-key"]})))
    for path in ("/ready", "/health"):
        answer = client.get(path)
        assert answer.status_code == 503 and answer.json()["error_type"] == "not_ready", path
    assert "attnserve_num_requests_waiting" in client.get("/metrics").text


@targets
def test_every_attnserve_variable_is_a_server_setting(monkeypatch, target):
    objects = render(target)
    names = set(pod_environment(objects)) | {v["name"] for v in container(objects)["env"]}
    for name in names:
        if name.startswith(ENV_PREFIX) and name not in ENGINE_VARIABLES | {API_KEY_VARIABLE}:
            field = name.removeprefix(ENV_PREFIX).lower()
            assert field in Settings.model_fields, f"{name} is no setting (pydantic-settings ignores it)"
    served_settings(monkeypatch, target).engine_config()          # the server would take them


@targets
def test_api_keys_come_from_an_optional_secret(target):
    (keys,) = [v for v in container(render(target))["env"] if v["name"] == "ATTNSERVE_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is True        # a comma list of keys
    for config_map in (o for o in render(target) if o["kind"] == "ConfigMap"):
        assert not any("API_KEY" in key for key in config_map["data"]), "a key in a ConfigMap"


@targets
def test_the_grace_period_outlasts_the_prestop_sleep_and_the_drain(monkeypatch, target):
    objects = render(target)
    grace = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = served_settings(monkeypatch, target).drain_timeout
    assert drain > 0
    assert grace > prestop_sleep_seconds(objects) + drain        # the kubelet counts both
    assert prestop_sleep_seconds(objects) >= 1


@targets
def test_the_startup_probe_waits_at_least_as_long_as_the_image_healthcheck(target):
    startup = container(render(target))["startupProbe"]
    (healthcheck,) = instructions(stage(TARGETS[target]), "HEALTHCHECK")
    start_period = int(re.search(r"--start-period=(\d+)s", healthcheck).group(1))
    assert startup["periodSeconds"] * startup["failureThreshold"] >= start_period


@targets
def test_the_pod_runs_as_the_image_user_on_a_read_only_root(target):
    objects = render(target)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (uid,) = set(re.findall(r"useradd .*--uid (\d+)", " ".join(instructions(stage(TARGETS[target]), "RUN"))))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    security = container(objects)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert f"{IMAGE_HOME}/.cache" in " ".join(instructions(stage(TARGETS[target]), "RUN"))
    env = pod_environment(objects)
    # The image's prebuilt kernels (read-only there) are loaded from a copy in the cache.
    kernels = f"{IMAGE_HOME}/.cache/attnserve/kernels"
    writable = ["/tmp", f"{IMAGE_HOME}/.cache/torch", kernels] + [env[k] for k in ("TRITON_CACHE_DIR",) if k in env]
    for path in writable:
        assert "emptyDir" in mounted_volume(objects, path), path


@targets
def test_resources_are_requested_and_limited(monkeypatch, target):
    resources = container(render(target))["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert resources["requests"] == resources["limits"]          # Guaranteed QoS
    settings = served_settings(monkeypatch, target)
    if TARGETS[target] == "cuda":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert settings.device == "cuda"
    else:
        assert "nvidia.com/gpu" not in resources["limits"]


def test_the_gpu_overlay_runs_the_cuda_image_with_larger_batches(monkeypatch):
    assert container(render("overlays/gpu"))["image"] == "attnserve:cuda"
    assert container(render("overlays/cpu"))["image"] == "attnserve:cpu"
    gpu = served_settings(monkeypatch, "overlays/gpu")
    cpu = served_settings(monkeypatch, "overlays/cpu")
    assert gpu.max_num_seqs > cpu.max_num_seqs


@targets
def test_selectors_find_the_pods(target):
    objects = render(target)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector and selector.items() <= pod_labels.items()
    monitor_selector = one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert monitor_selector and monitor_selector.items() <= service["metadata"]["labels"].items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


# -- scaling on the queue -----------------------------------------------------------------------

def hpa_metric(objects: list[dict]) -> str:
    (metric,) = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    return metric["pods"]["metric"]["name"]


def adapter_rules() -> list[dict]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    return values["rules"]["custom"]


def adapter_metric_name(rule: dict, series: str) -> str:
    """The name prometheus-adapter serves `series` under (Go's ${1} is Python's \\g<1>)."""
    replacement = re.sub(r"\$\{(\d+)\}", r"\\g<\1>", rule["name"]["as"])
    return re.sub(rule["name"]["matches"], replacement, series)


@targets
def test_the_hpa_scales_the_deployment_on_the_queue_gauge_the_server_exports(target):
    objects = render(target)
    hpa = one(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2            # the PDB's one unavailable pod leaves one serving
    exported = {family.name: family.type for family in Metrics().registry.collect()}
    assert hpa_metric(objects) == "attnserve_num_requests_waiting"
    assert exported[hpa_metric(objects)] == "gauge"   # averaged over pods, as the HPA does


def test_the_adapter_rule_serves_the_hpa_metric_per_pod():
    metric = hpa_metric(render("base"))
    (rule,) = adapter_rules()
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert series.group(1) == metric
    assert adapter_metric_name(rule, series.group(1)) == metric
    # The Prometheus operator labels every series with its pod's namespace and name.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "by (<<.GroupBy>>)"):
        assert placeholder in rule["metricsQuery"]


def test_the_adapter_query_is_valid_promql(tmp_path):
    """The query as the adapter fills it in for two pods, checked by promtool."""
    promtool = require("promtool", "Debian package prometheus; .ci/run installs it")
    (rule,) = adapter_rules()
    query = (rule["metricsQuery"].replace("<<.Series>>", hpa_metric(render("base")))
             .replace("<<.LabelMatchers>>", 'namespace="attnserve",pod=~"attnserve-a|attnserve-b"')
             .replace("<<.GroupBy>>", "pod"))
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "attnserve:adapter_query", "expr": query}]}]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the pod's filesystem, here ----------------------------------------------------------------

class ReadOnlyRootServer(ServerProcess):
    """`python -m service` in a private mount namespace laid out as the pod's: the root
    filesystem read-only, writable only at the Deployment's emptyDir mounts."""

    def __init__(self, args: list[str], env: dict[str, str], writable: list[str]):
        super().__init__(args, env)
        self.writable = writable

    def mount_script(self, holds: dict[Path, Path]) -> str:
        """sh: an empty tmpfs at each writable path, then the root read-only, then exec "$@".
        A tmpfs would hide this checkout or its interpreter where they live under one (a clone
        in /tmp): each such folder is bind-mounted to its hold first and back after."""
        lines = ["set -e", *(f"mount --bind {kept} {hold}" for kept, hold in holds.items())]
        tops = [Path("/", Path(path).parts[1]) for path in self.writable]
        assert len(set(tops)) == len(tops), "two writable paths under one top folder"
        for path, top in zip(map(Path, self.writable), tops):
            kept_here = [f"mkdir -p {kept} && mount --bind {hold} {kept}" for kept, hold in holds.items()
                         if kept.is_relative_to(top)]
            if path == top:
                lines += [f"mount -t tmpfs tmpfs {path}", *kept_here]
            else:       # a tmpfs over its top folder holds the path's parents, then turns read-only
                lines += [f"mount -t tmpfs tmpfs {top}", f"mkdir -p {path}", f"mount -t tmpfs tmpfs {path}",
                          *kept_here, f"mount -o remount,ro {top}"]
        return "\n".join([*lines, "mount -o remount,bind,ro /", 'exec "$@"'])

    def hidden_folders(self) -> list[Path]:
        """This checkout and the interpreter's prefix, where a writable mount would cover them."""
        needed = {REPO.resolve(), Path(sys.prefix).resolve()}
        tops = {Path("/", Path(path).parts[1]) for path in self.writable}
        return sorted(p for p in needed if any(p.is_relative_to(top) for top in tops))

    def start(self, timeout: float = 90.0, wait: bool = True) -> "ReadOnlyRootServer":
        # Holds live in /dev/shm (its own tmpfs, outside every writable path); empty after the test.
        self.holds = {kept: Path(tempfile.mkdtemp(dir="/dev/shm")) for kept in self.hidden_folders()}
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", self.mount_script(self.holds),
                   "sh", sys.executable, "-m", "service", *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self


def can_mount_privately() -> str | None:
    """Why a private mount namespace with a read-only root cannot be made here (None: it can)."""
    if shutil.which("unshare") is None:
        return "no `unshare` (util-linux)"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           "mount -o remount,bind,ro / && ! test -w /"],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"no private read-only root here: {done.stderr.strip()}"


@pytest.mark.slow
def test_the_server_serves_and_drains_on_the_pods_read_only_root():
    """The CPU overlay's environment and writable mounts, the image's default models, a small
    KV cache: ready, a generation and an embedding, then SIGTERM: a drain and exit 0."""
    reason = can_mount_privately()
    if reason:
        pytest.fail(reason) if in_ci() else pytest.skip(reason)
    objects = render("overlays/cpu")
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in container(objects)["volumeMounts"] if m["name"] in empty_dirs]
    env = pod_environment(objects) | {"HOME": IMAGE_HOME}
    server = ReadOnlyRootServer(["--kv-cache-memory", "64MiB", "--max-num-seqs", "8"], env, writable)
    try:
        server.start(timeout=180)
        answer = server.post("/generate", json={"inputs": "The cat", "parameters": {"max_new_tokens": 8}})
        assert answer.status_code == 200, answer.text
        assert server.post("/embed", json={"inputs": "a sentence"}).status_code == 200
    finally:
        code = server.stop()
        for hold in server.holds.values():
            hold.rmdir()
    logs = server.logs()
    assert code == 0, logs[-4000:]
    assert "Read-only file system" not in logs, logs[-4000:]
