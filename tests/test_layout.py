"""docs/architecture.md against the source: its table lists every file, its dependency list draws
every import between our modules and no other; and its rules hold: imports flow one way, the leaves
import nothing of ours, the method imports no training code, no module takes another's private name
or a CLI's argument parsing, nothing imports bench.py, and only the command line's edge exits."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
# our files and the module names they have once installed (kernels/ and weights/ are mapped into coop_min)
PACKAGES = {"coop_min": "coop_min", "kernels": "coop_min.kernels", "weights": "coop_min.weights"}
LEAVES = {"coop_min.clip", "coop_min.tokenizer", "coop_min.transforms", "coop_min.templates",
          "coop_min.files", "coop_min.cli"}


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
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            out.append((base, names))
            out += [(f"{base}.{n}", []) for n in names]    # `from coop_min import data` imports a module
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


def _defined(path):
    """The names a module's top level defines (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _dependencies(modules, graph):
    """{module: {modules it imports}}, where importing a package counts only for a name its
    __init__.py defines (`from coop_min import data` depends on coop_min.data, not on the package)."""
    deps = {}
    for name, targets in graph.items():
        deps[name] = {t for t, names in targets.items() if not names or set(names) & _defined(modules[t])}
    return deps


def _page_dependencies():
    """{module: {modules it imports}} as the page's "Dependencies flow one way" block draws them. An
    entry continues on the next line when its line ends with "," or ";" or the next is indented;
    "(...)" says why and ";" starts what is not an import (subprocesses)."""
    block = PAGE.read_text().split("## Dependencies flow one way")[1].split("```")[1]
    entries = []
    for line in block.strip().splitlines():
        if entries and (entries[-1].rstrip().endswith((",", ";")) or line[:1].isspace()):
            entries[-1] += " " + line.strip()
        else:
            entries.append(line.strip())
    drawn = {}
    for entry in entries:
        entry = re.sub(r"\([^)]*\)", "", entry)
        if entry.endswith(": nothing of ours"):
            sources = entry.removesuffix(": nothing of ours")
            targets = ""
        else:
            sources, targets = entry.split(";")[0].split("->")
        for source in _names(sources):
            drawn.setdefault(source, set()).update(_names(targets))
    return drawn


def _names(text):
    """coop_min's module names of a list as the page writes it ("kernels.attention, runs")."""
    names = [w.strip() for w in text.split(",")]
    return {"coop_min" if n == "coop_min" else f"coop_min.{n}" for n in names if n}


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
                 "coop_min.distributed", "coop_min.options", "coop_min.checkpoint", "coop_min.progress",
                 "coop_min.inputs", "coop_min.cuda_graph", "coop_min.kernels.cosine_ce",
                 "coop_min.kernels.elementwise", "coop_min.kernels.attention"}
    assert not forbidden & set(graph["coop_min.prompts"]), graph["coop_min.prompts"]
    assert "coop_min.fast" not in graph["coop_min.prompts"] and not any(
        "coop_min.fast" in graph[k] for k in graph if k.startswith("coop_min.kernels"))
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
    (tmp_path / "coop_min" / "c.py").write_text("from coop_min.b import parse_args\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGES", {"coop_min": "coop_min"})
    import pytest
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="_hidden"):
        test_no_module_takes_another_modules_private_name()
    with pytest.raises(AssertionError, match="imports b.parse_args"):
        test_nothing_calls_or_imports_another_modules_command_line()


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
        guards = [g for g in ast.walk(tree) if isinstance(g, ast.If) and "__main__" in ast.unparse(g.test)]
        guarded = {id(n) for guard in guards for n in ast.walk(guard)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "SystemExit":
                raise AssertionError(f"{path.name}:{node.lineno} raises SystemExit; raise cli.UsageError")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "quit"):
                assert id(node) in guarded, \
                    f"{path.name}:{node.lineno} exits; return a code to cli.run instead"


COMMAND_LINE = ("parse_args", "main", "_main")


def test_nothing_calls_or_imports_another_modules_command_line():
    """A module may share another's declarations (options.add_options), never run its command line:
    no `module.parse_args(...)` or `module.main(...)` of one of our modules outside it, and no
    `from module import parse_args`."""
    modules, graph = _graph()
    for name, targets in graph.items():
        for target, names in targets.items():
            taken = set(names) & set(COMMAND_LINE)
            assert not taken, f"{name} imports {target.rpartition('.')[2]}.{sorted(taken)[0]}"
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        ours = set()                                  # local names bound to our modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("coop_min"):
                ours |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                ours |= {a.asname or a.name for a in node.names if a.name in modules}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COMMAND_LINE and \
                    isinstance(node.value, ast.Name) and node.value.id in ours:
                raise AssertionError(f"{path.name}:{node.lineno} calls {node.value.id}.{node.attr}")


def test_the_page_draws_every_import_and_no_other():
    """The dependency list of docs/architecture.md is the code's: every module of ours has a line,
    every import between our modules is drawn, and every edge drawn between two modules that exist
    is an import."""
    modules, graph = _graph()
    code = _dependencies(modules, graph)
    drawn = _page_dependencies()
    short = lambda name: name.removeprefix("coop_min.")  # noqa: E731
    missing = sorted(short(m) for m in modules if m not in drawn)
    assert not missing, f"docs/architecture.md has no line for {missing} under 'Dependencies flow one way'"
    for name, targets in code.items():
        undrawn = sorted(short(t) for t in targets - drawn[name])
        assert not undrawn, f"docs/architecture.md does not draw {short(name)} -> {', '.join(undrawn)}"
        stale = sorted(short(t) for t in drawn[name] - targets if t in modules)
        assert not stale, f"docs/architecture.md draws {short(name)} -> {', '.join(stale)}, not imported"


def test_the_page_names_every_file():
    """docs/architecture.md names every module of ours and bench.py: the four of its reading order,
    the rest in its list of files (an entry may name several, the folder of the first applying to the
    rest)."""
    listed = set(re.findall(r"^\d+\. `([^`]+)`", PAGE.read_text(), re.M))
    for entry in PAGE.read_text().splitlines():
        if entry.startswith("- `"):
            folder = ""
            for name in re.findall(r"`([^`]+)`", entry.split(" — ")[0]):
                folder = name.rpartition("/")[0] or folder
                listed.add(name if "/" in name else f"{folder}/{name}".lstrip("/"))
    files = {str(p.relative_to(ROOT)) for folder in PACKAGES for p in (ROOT / folder).glob("*.py")}
    unlisted = sorted(f for f in files | {"bench.py"} if not f.endswith("__init__.py") and f not in listed)
    assert not unlisted, f"docs/architecture.md's table has no row for {unlisted}"
