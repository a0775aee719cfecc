"""The package's imports: no circles, no import from a higher layer, and no imports
hidden inside functions.

Imports are read from the source with `ast` (nothing is imported). An import inside a
function is allowed only in `cli/` (subcommands load what they need, so `--help` stays
fast) and for the optional extras (`[export]`: LiteRT, ONNX); the package roots' PEP 562
lazy attribute tables (`importlib.import_module`) are not import statements.

The layers (`LAYERS`, lowest first): a module may import its own layer or a lower one.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "deepseek_tf"
PACKAGE = "deepseek_tf"
# optional extras, and matplotlib (heavy: loaded only when a plot is written)
OPTIONAL = (
    "ai_edge_litert",
    "onnxruntime",
    "tf2onnx",
    "flwr",
    "wandb",
    "matplotlib",
    "pyarrow",
    "gguf",
    "llama_cpp",
    # heavy, loaded on first use: about 1.5 s each at every start (tests/cli/test_quiet.py
    # checks that the API does not load them)
    "tensorflow_probability",
    "dp_accounting",
)
OPTIONAL_MODULES = ("deepseek_tf.federated.flower_app",)  # needs the [federated] extra

# Each module's layer is that of its top-level package or module (`deepseek_tf.X...`);
# the package root (`deepseek_tf/__init__.py`, the public names) sits with the API.
LAYERS = (
    ("errors", "config", "text_files", "quiet", "xla_cache"),  # plain Python
    ("layers",),  # Keras layers
    ("models",),  # the model built from a config
    ("tokenizers",),
    ("generation", "training", "data", "run_layout"),  # run_layout: a run's files
    ("rundir",),  # opening a run: its layout, model and tokenizer
    ("serving", "export", "convert", "compress", "federated", "uncertainty"),
    ("api", ""),  # "": the package root
    ("cli",),
)
# Upward imports not fixed yet, each with what removes it. The test fails on any other,
# and on an entry here that no longer occurs (delete it then).
KNOWN_UPWARD: dict = {}  # (module, dependency): why it may import upward


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _target(node, module: str) -> list[str]:
    """The deepseek_tf modules an import statement imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    base = node.module or ""
    if node.level:  # relative import
        package = module.split(".")[: -node.level]
        base = ".".join([*package, base] if base else package)
    if base.split(".")[0] != PACKAGE:
        return []
    out = []
    for alias in node.names:  # `from a.b import c`: the submodule a.b.c when there is one
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _imports(module: str) -> tuple[set[str], list[str]]:
    """(deepseek_tf modules imported anywhere in the module, imports inside functions).

    A circle through an import inside a function is still a circle (it only fails later).
    """
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(_target(node, module))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    name = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                    nested.append(f"{module}:{sub.lineno} imports {name} in {node.name}()")
    return top - {module}, nested


GRAPH = {m: _imports(m)[0] for m in MODULES}


def test_the_import_graph_has_no_circles():
    state, stack, circles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(GRAPH.get(module, ())):
            if state.get(dep) == "open":
                circles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(circles)


def layer_of(module: str) -> int:
    """The index in `LAYERS` of `module`'s layer."""
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: not placed in a layer; add {top!r} to LAYERS")


def upward_imports() -> set[tuple[str, str]]:
    """`(module, imported module)` for every import of a higher layer than the module's."""
    return {
        (module, dep)
        for module in MODULES
        for dep in GRAPH.get(module, ())
        if dep in MODULES and layer_of(dep) > layer_of(module)
    }


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    found = upward_imports() - set(KNOWN_UPWARD)
    lines = [
        f"{module} ({'/'.join(LAYERS[layer_of(module)])}) imports {dep} "
        f"({'/'.join(LAYERS[layer_of(dep)])})"
        for module, dep in sorted(found)
    ]
    assert not lines, "imports from a higher layer:\n" + "\n".join(lines)


def test_the_known_upward_imports_are_still_there():
    """An entry of `KNOWN_UPWARD` that was fixed is deleted from it."""
    fixed = set(KNOWN_UPWARD) - upward_imports()
    assert not fixed, f"fixed, so delete from KNOWN_UPWARD: {sorted(fixed)}"


def test_the_layer_check_finds_an_upward_import(monkeypatch):
    """The check itself can fail: a layer that imports the CLI is caught."""
    made_up = {"deepseek_tf.layers.x": {"deepseek_tf.cli.main"}, "deepseek_tf.cli.main": set()}
    monkeypatch.setattr(f"{__name__}.GRAPH", made_up)
    monkeypatch.setattr(f"{__name__}.MODULES", dict.fromkeys(made_up))
    monkeypatch.setattr(f"{__name__}.KNOWN_UPWARD", {})
    with pytest.raises(AssertionError, match="deepseek_tf.layers.x .layers. imports "):
        test_no_module_imports_from_a_higher_layer()
    monkeypatch.setattr(f"{__name__}.GRAPH", {"deepseek_tf.cli.main": {"deepseek_tf.layers.x"}})
    test_no_module_imports_from_a_higher_layer()  # downward: fine


def test_no_imports_inside_functions_outside_the_cli():
    found = []
    for module in MODULES:
        if module.startswith(f"{PACKAGE}.cli"):
            continue
        for note in _imports(module)[1]:
            imported = note.split(" imports ")[1].split(" ")[0]
            if imported.split(".")[0] not in OPTIONAL and imported not in OPTIONAL_MODULES:
                found.append(note)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source,circle",
    [
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_the_circle_finder_finds_circles(source, circle, monkeypatch):
    """The check itself can fail: a made-up graph with a circle is caught."""
    monkeypatch.setattr(f"{__name__}.GRAPH", source)
    monkeypatch.setattr(f"{__name__}.MODULES", dict.fromkeys(source))
    if circle:
        with pytest.raises(AssertionError, match="a -> b -> a"):
            test_the_import_graph_has_no_circles()
    else:
        test_the_import_graph_has_no_circles()
