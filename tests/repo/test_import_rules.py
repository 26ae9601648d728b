"""The package's import rules (README "Code layout"), read from the source.

Every `import` and `from ... import` in llama/, at module level or inside a
function, is an arrow from one wing to another. The rules: each wing imports
only the wings listed for it in ALLOWED, the arrows between wings form no
circle, and the text wing (with everything it imports) needs no torch.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "llama"

# What each wing may import besides itself. A wing is a folder of llama/, or
# one of the top-level modules (model, generation, builder, ...).
ALLOWED = {
    "common": set(),
    "text": {"common"},
    "weights": {"common"},
    "parallel": {"common"},
    "model": {"common", "parallel", "weights.args", "weights.schema"},
    "kernels": {"common", "parallel", "weights", "model"},
    "engine": {"common", "text", "parallel", "weights.args", "model"},
    "builder": {"common", "text", "weights", "parallel", "model", "kernels", "engine"},
    "generation": {"common", "text", "weights", "parallel", "model", "engine", "builder"},
    "tokenizer": {"text"},
    "chat": {"common", "text", "parallel", "engine", "generation"},
    "server": {"common", "text", "engine", "generation"},
    "cli": {"common", "text", "weights", "parallel", "kernels", "engine", "generation", "builder", "chat", "server"},
    "__init__": {"common", "text", "weights", "engine", "generation", "model"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path):
    """(line, imported module or module.name) for every import in `path`."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from . import x` imports module x
                yield node.lineno, f"{target}.{alias.name}"


def wing(module: str) -> str:
    """llama.text.tokenizer -> text; llama.model -> model; llama -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def allowed(source: str, target: str) -> bool:
    src, dst = wing(source), wing(target)
    if src == dst:
        return True
    rules = ALLOWED[src]
    sub = ".".join(target.split(".")[1:3])  # weights.args, weights.schema
    return dst in rules or any(sub == r or sub.startswith(r + ".") for r in rules)


def internal_arrows():
    """(source module, line, target module) for every import of llama by llama."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for line, target in imports(path):
            if not (target == "llama" or target.startswith("llama.")):
                continue
            while target not in known:  # `from .x import Name`: the module is x
                target = target.rsplit(".", 1)[0]
            yield source, line, target


def test_every_wing_has_rules():
    wings = {wing(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert wings <= set(ALLOWED), f"wings without import rules: {sorted(wings - set(ALLOWED))}"


def test_each_wing_imports_only_what_its_rules_allow():
    broken = [f"{s}:{line} imports {t}" for s, line, t in internal_arrows() if not allowed(s, t)]
    assert not broken, "imports against the rules:\n" + "\n".join(broken)


def test_the_wings_form_no_circle():
    edges = {}
    for s, _, t in internal_arrows():
        if wing(s) != wing(t):
            edges.setdefault(wing(s), set()).add(wing(t))
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            circle = path[path.index(node):] + [node]
            raise AssertionError("circle of imports: " + " -> ".join(circle))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        visit(node, [])


def test_nothing_outside_the_command_line_imports_it():
    users = sorted({s for s, _, t in internal_arrows() if wing(t) == "cli" and wing(s) not in ("cli", "__main__")})
    assert not users


@pytest.mark.parametrize("name", ["text", "common"])
def test_the_text_wing_names_no_torch(name):
    """No import of torch (or numpy) anywhere in these wings, even inside a function."""
    heavy = [f"{module_name(p)}:{line} imports {t}" for p in sorted((PACKAGE / name).rglob("*.py"))
             for line, t in imports(p) if t.split(".")[0] in ("torch", "numpy", "fairscale")]
    assert not heavy


def test_the_text_layer_and_the_package_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "import llama, llama.tokenizer, llama.text.tokenizer, llama.text.chat_format, llama.text.tool_calls, "
            "llama.text.messages, llama.text.stream\n"
            "from llama import ChatFormat, Tokenizer, StopReason, Message, ModelArgs, ToolCall\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_the_rules_catch_a_forbidden_import():
    """The checker itself: arrows the rules forbid are reported."""
    assert not allowed("llama.model", "llama.kernels.native")
    assert not allowed("llama.model", "llama.weights.checkpoint")
    assert allowed("llama.model", "llama.weights.schema")
    assert not allowed("llama.text.tokenizer", "llama.weights.args")
    assert not allowed("llama.parallel.collectives", "llama.engine.sampling")
    assert not allowed("llama.server.app", "llama.cli.options")
    assert wing("llama") == "__init__" and wing("llama.text.stream") == "text"
