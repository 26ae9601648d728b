"""Runs a command and reports its peak memory, split into anonymous memory
(what the program allocated) and file-backed pages (memory-mapped inputs,
which the kernel can drop and re-read under pressure). Linux only.

    python benchmarks/peak_memory.py -- python utils/shard_model_checkpoint.py -n 2 -i big/ -o big-2/
"""

import subprocess
import sys
import time


def _status(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024  # kB -> bytes
    return fields


def measure(cmd, interval: float = 0.02, **popen) -> dict:
    """Peak RssAnon, RssFile and VmHWM (peak total RSS) of `cmd`, sampled every `interval` s;
    `popen` goes to subprocess.Popen (stdout=, env=, ...)."""
    proc = subprocess.Popen(cmd, **popen)
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            for key, value in _status(proc.pid).items():
                peak[key] = max(peak[key], value)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(interval)
    proc.wait()
    return {**peak, "seconds": time.perf_counter() - start, "returncode": proc.returncode}


def main() -> int:
    if "--" not in sys.argv:
        print(__doc__)
        return 2
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    r = measure(cmd)
    gb = 1e9
    print(f"peak RSS {r['VmHWM'] / gb:.2f} GB (anonymous {r['RssAnon'] / gb:.2f} GB, file-backed "
          f"{r['RssFile'] / gb:.2f} GB), {r['seconds']:.1f} s, exit code {r['returncode']}")
    return r["returncode"]


if __name__ == "__main__":
    sys.exit(main())
