"""llama/common/cpu.py, the one CPU probe, on the /proc/cpuinfo text and sysfs
trees of other machines (x86 with hyper-threads, aarch64, none at all)."""

import sys
import subprocess

from conftest import REPO
from llama.common import cpu

X86 = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
       "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16\nvmx flags\t: ept\n\n"
       "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
       "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16\n")
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n"


def test_flags_of_the_first_cpu_on_x86_and_aarch64():
    assert cpu.cpu_flags(X86) == frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"})
    assert cpu.cpu_flags(ARM) == frozenset({"fp", "asimd", "bf16", "sve"})
    assert cpu.cpu_flags("processor\t: 0\n") is None  # no flags line: the caller falls back
    assert cpu.cpu_flags("") is None


def test_cpu_id_keeps_model_and_flags_once():
    assert cpu.cpu_id(X86) == ("model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                               "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16")
    assert cpu.cpu_id(ARM) == "Features\t: fp asimd bf16 sve"


def test_without_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    assert cpu.cpuinfo_text() is None and cpu.cpu_flags() is None and cpu.cpu_id() is None
    (tmp_path / "cpuinfo").write_text(ARM)
    assert cpu.cpuinfo_text(tmp_path / "cpuinfo") == ARM
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu.cpu_flags() == cpu.cpu_flags(ARM)


def test_physical_cores_count_package_and_core(tmp_path):
    # 8 logical CPUs: 2 packages x 2 cores x 2 hyper-threads; cpu i and i + 4 share a core.
    for i in range(8):
        topology = tmp_path / f"cpu{i}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{i % 4 // 2}\n")
        (topology / "core_id").write_text(f"{i % 2}\n")
    assert cpu.physical_cores(range(8), tmp_path) == 4
    assert cpu.physical_cores([0, 4], tmp_path) == 1
    assert cpu.physical_cores([1, 2, 3], tmp_path / "missing") == 3  # unreadable: the logical count
    assert cpu.physical_cores([], tmp_path) == 1


def test_this_machine_and_no_torch():
    """It reads this machine's files, and imports neither torch nor anything of llama."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "import llama.common; before = set(sys.modules)\n"
            "from llama.common import cpu\n"
            "print(cpu.physical_cores([0]), cpu.cpu_flags() is None or isinstance(cpu.cpu_flags(), frozenset))\n"
            "print(sorted(set(sys.modules) - before))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1 True", "['llama.common.cpu']"]
