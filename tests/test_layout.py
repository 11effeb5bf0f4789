"""The dependency rules of docs/architecture.md, read from the source: imports flow one way, the
leaves import nothing of ours, no module takes another's private name, nothing imports bench.py."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# our files and the module names they have once installed (kernels/ and weights/ are mapped into coop_min)
PACKAGES = {"coop_min": "coop_min", "kernels": "coop_min.kernels", "weights": "coop_min.weights"}
LEAVES = {"coop_min.clip", "coop_min.tokenizer", "coop_min.transforms", "coop_min.templates", "coop_min.files",
          "coop_min.cli"}


def _modules():
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _imports(name, path):
    """[(imported module, [names taken from it])] of one file, relative imports resolved."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            out.append((base, names))
            out += [(f"{base}.{n}", []) for n in names]          # `from coop_min import data` imports a module
    return out


def _graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {}
        for target, names in _imports(name, path):
            if target in modules and target != name:
                graph[name].setdefault(target, []).extend(names)
    return modules, graph


def test_no_import_cycles():
    _, graph = _graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(nxt):] + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"
    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_module_takes_another_modules_private_name():
    _, graph = _graph()
    private = [(a, b, n) for a, targets in graph.items() for b, names in targets.items() for n in names
               if n.startswith("_")]
    assert not private, private


def test_leaves_import_nothing_of_ours_and_kernels_know_no_clip():
    _, graph = _graph()
    for leaf in LEAVES:
        assert not graph[leaf], (leaf, graph[leaf])
    for name, targets in graph.items():
        if name.startswith("coop_min.kernels"):
            assert all(t.startswith("coop_min.kernels") for t in targets), (name, targets)


def test_the_method_imports_no_data_training_or_speed_code():
    _, graph = _graph()
    forbidden = {"coop_min.data", "coop_min.train", "coop_min.evaluate", "coop_min.runs", "coop_min.fast",
                 "coop_min.distributed", "coop_min.kernels.cosine_ce", "coop_min.kernels.elementwise"}
    assert not forbidden & set(graph["coop_min.prompts"]), graph["coop_min.prompts"]
    assert "coop_min.train" not in graph["coop_min.evaluate"]


def test_nothing_imports_bench_or_the_tests():
    modules, _ = _graph()
    for name, path in modules.items():
        targets = {t.split(".")[0] for t, _ in _imports(name, path)}
        assert not targets & {"bench", "benchmarks", "tests", "conftest"}, (name, targets)


def test_the_rules_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted cycle and a private import are caught."""
    (tmp_path / "coop_min").mkdir()
    (tmp_path / "coop_min" / "a.py").write_text("from coop_min.b import _hidden\n")
    (tmp_path / "coop_min" / "b.py").write_text("from coop_min import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGES", {"coop_min": "coop_min"})
    import pytest
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="_hidden"):
        test_no_module_takes_another_modules_private_name()


def test_the_checkout_leaves_huggingface_kernels_and_transformers_importable():
    """kernels/ is ours, but the checkout's root is never on sys.path, so `kernels` is Hugging Face's
    package (transformers 5 imports it) and transformers works in the test process."""
    import sys
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path), sys.path
    import transformers
    assert transformers.CLIPModel.__name__ == "CLIPModel"
    import kernels
    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels", kernels.__file__
    import coop_min.kernels
    assert Path(coop_min.kernels.__file__).resolve().parent == ROOT / "kernels"   # ours, as a sub-package


def test_only_the_command_line_edge_exits():
    """One way to fail: library code raises; coop_min/cli.py alone turns that into an exit code (a
    script's `if __name__ == "__main__"` block may pass main's code to sys.exit)."""
    modules, _ = _graph()
    for name, path in modules.items():
        if name == "coop_min.cli":
            continue
        tree = ast.parse(path.read_text())
        guarded = {id(n) for guard in ast.walk(tree) if isinstance(guard, ast.If) and "__main__" in ast.unparse(guard.test)
                   for n in ast.walk(guard)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                raise AssertionError(f"{path.name}:{node.lineno} raises SystemExit; raise cli.UsageError")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "quit"):
                assert id(node) in guarded, f"{path.name}:{node.lineno} exits; return a code to cli.run instead"


def test_nothing_calls_another_modules_command_line():
    """A module may share another's declarations (train.add_options), never run its command line:
    no `module.parse_args(...)` or `module.main(...)` of one of our modules outside it."""
    modules, _ = _graph()
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        ours = set()                                  # local names bound to our modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("coop_min"):
                ours |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                ours |= {a.asname or a.name for a in node.names if a.name in modules}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("parse_args", "main", "_main") and \
                    isinstance(node.value, ast.Name) and node.value.id in ours:
                raise AssertionError(f"{path.name}:{node.lineno} calls {node.value.id}.{node.attr}")
