"""The project's modules import one way: scripts -> pipeline -> models -> model file, with no
cycle, and the deploy runtime imports nothing from training. Read from the source (every import
statement, function-level ones included), not from what happens to be imported at run time."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datasets", "models", "utils")
SCRIPTS = ("train", "val", "predict", "export_model", "infer")
# What the deploy runtime may use of the project (it may also import numpy, the standard
# library, paddle.inference / paddle.base / paddle.device and onnxruntime); models.calibration
# holds the verdict rules the model file's record is checked against, in NumPy.
DEPLOY_MAY_IMPORT = {"models.model_file", "models.calibration", "utils.files", "utils.numbers", "utils.morphology",
                     "models", "utils"}
TRAINING = {"models.pipeline", "models.padim", "models.backbones", "models.static", "models.export",
            "models.evaluate", "models.torch_weights", "models.convert", "datasets"}
BELOW_PIPELINE = ("models.model_file", "models.deploy", "models.export", "models.static", "models.padim",
                  "models.backbones")


def module_files() -> dict:
    files = {name: ROOT / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES + ("tools",):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(path: Path, module: str) -> set:
    """Every module named by an import statement anywhere in the file, resolved to full names."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_graph() -> tuple[dict, dict]:
    files = module_files()
    external = {}
    graph = {}
    for module, path in files.items():
        names = imported_names(path, module)
        graph[module] = {name for name in names if name in files and name != module}
        external[module] = {name for name in names if name.split(".")[0] not in files}
    return graph, external


def find_cycle(graph: dict) -> list | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def closure(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_reader_sees_function_level_and_relative_imports():
    graph = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})
    assert graph == ["a", "b", "c", "a"]
    graph, _ = project_graph()
    assert "models.evaluate" in graph["train"]           # imported inside main()
    assert "models.model_file" in graph["models.deploy"]


def test_no_import_cycle():
    graph, _ = project_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_run_one_way():
    graph, _ = project_graph()
    for module, targets in graph.items():
        if not module.startswith("tools."):
            assert not targets & set(SCRIPTS), f"{module} imports a script: {targets & set(SCRIPTS)}"
    for module in BELOW_PIPELINE:
        above = closure(graph, module) & {"models.pipeline", "models.evaluate"}
        assert not above, f"{module} reaches {above}"


def test_deploy_imports_nothing_from_training():
    graph, external = project_graph()
    reached = closure(graph, "models.deploy")
    assert reached <= DEPLOY_MAY_IMPORT, reached - DEPLOY_MAY_IMPORT
    assert not {m for m in reached if m.split(".")[0] == "datasets" or m in TRAINING}
    for module in reached | {"models.deploy"}:
        paddle = {name for name in external[module] if name.split(".")[0] == "paddle"}
        allowed = {"paddle", "paddle.inference", "paddle.base", "paddle.base.core", "paddle.device"}
        assert paddle <= allowed and (module == "models.deploy" or not paddle), (module, paddle)


def test_deploy_loads_without_paddle_or_training_code():
    """At import, the runtime module pulls in neither Paddle nor any training module."""
    import subprocess
    import sys
    code = ("import sys, models.deploy; bad = [m for m in sys.modules if m.split('.')[0] in ('paddle', 'datasets') "
            "or m in ('models.pipeline', 'models.padim', 'models.backbones')]; print(bad)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
