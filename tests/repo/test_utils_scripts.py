"""The utils/ scripts run from a clone that is not installed, from any
working directory, and are thin wrappers over the package.

How this proves "not installed": the test environment may have the package
installed (an editable install of some clone), so the scripts run under
`python -S` (no site-packages processing: no .pth files, so no editable
install's finder) with PYTHONPATH set to the test environment's
site-packages directory alone (torch, numpy, gguf visible, no `llama`). A
control run in the same setting shows that `import llama` then fails; the
script still works only because it puts its own clone on sys.path.
"""

import ast
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import REPO

SCRIPTS = ["shard_model_checkpoint.py", "convert_gguf_checkpoint.py", "make_random_checkpoint.py", "export_gguf.py",
           "cluster_launch.py"]


def bare_python(args, cwd):
    """Python with torch & co. but without this package: see the module docstring."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_package_is_not_importable_in_the_bare_setting(tmp_path):
    r = bare_python(["-c", "import torch, numpy; import llama"], cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'llama'" in r.stderr, r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_from_another_directory(script, tmp_path):
    r = bare_python([str(REPO / "utils" / script), "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: ") and "--help" in r.stdout


def test_script_imports_the_package_of_its_own_clone(tmp_path):
    """The clone's package wins over any installed one: its path is first on sys.path."""
    code = ("import runpy, sys; sys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_path({str(REPO / 'utils' / 'shard_model_checkpoint.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "import llama; print(llama.__file__, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == str(REPO / "llama" / "__init__.py")


def test_a_script_converts_from_another_directory(tiny_gguf, tmp_path):
    r = bare_python([str(REPO / "utils" / "convert_gguf_checkpoint.py"), "--gguf", str(tiny_gguf[0]),
                     "--out", "out"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "consolidated.00.pth").is_file() and "converted" in r.stdout


@pytest.mark.parametrize("script", ["convert_gguf_checkpoint.py", "export_gguf.py", "make_random_checkpoint.py",
                                    "shard_model_checkpoint.py"])
def test_scripts_are_thin_wrappers(script):
    """No library code in the script: at most a main() and one small adapter; the work is in llama/."""
    tree = ast.parse((REPO / "utils" / script).read_text(encoding="utf-8"))
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert "main" in functions and len(functions) <= 2, functions
    assert not [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert sum(1 for _ in open(REPO / "utils" / script)) < 90
