"""The server's connection limits, checked before anything loads: a plain
dataclass, importable without uvicorn or FastAPI (`llama serve` checks its
flags with it before loading the model; llama/server/run.py applies them)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The server's connection limits (see the module's docstring)."""

    keep_alive_timeout: float = 5.0
    request_timeout: float = 30.0
    max_connections: int = 512

    def check(self) -> None:
        if not self.keep_alive_timeout > 0:
            raise ValueError(f"--keep_alive_timeout must be more than 0 seconds, got {self.keep_alive_timeout}")
        if not self.request_timeout > 0:
            raise ValueError(f"--request_timeout must be more than 0 seconds, got {self.request_timeout}")
        if self.max_connections < 1:
            raise ValueError(f"--max_connections must be 1 or more, got {self.max_connections}")
