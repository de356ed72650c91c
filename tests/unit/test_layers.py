"""The package's layers, enforced: each layer imports only the layers below it, nothing imports in a cycle (imports
inside functions count), Ray stays out of the Ray-free layers, and every module imports on its own in a fresh
interpreter.

    core      config, model, optimizer, loss, engine, checkpoint state, storage: plain PyTorch + timm, no Ray
    data      sources, samplers, loaders, transforms: plain PyTorch, no Ray (except data.ray_data, Ray Data's path)
    run       the Ray side: driver, per-worker loop, Tune, capacity, reports
    commands  the user's sub-commands
    bench     benchmarks, which drive the commands' parser
    entry     `raytrain-cls` itself (entry, __main__)
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "raytrain_cls"
LAYERS = ("core", "data", "run", "commands", "bench")
TOP = len(LAYERS)  # raytrain_cls.entry and raytrain_cls.__main__ sit above every layer
RAY_ALLOWED_IN_RAY_FREE_LAYERS = {"raytrain_cls.data.ray_data"}  # Ray Data's input path, imported by run only


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # raytrain_cls/__init__.py: the version, importable by anyone
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return TOP


def project_module(name: str) -> str:
    """The module file an import statement lands in (`from raytrain_cls.bench import step` names a module)."""
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the module, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, in_function))
                found.extend(
                    (f"{child.module}.{alias.name}", child.lineno, in_function)
                    for alias in child.names
                    if f"{child.module}.{alias.name}" in MODULES
                )
            elif isinstance(child, ast.ImportFrom) and child.level > 0:
                found.append(("." * child.level + (child.module or ""), child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for name, _, _ in imports(module):
            if name == "raytrain_cls" or name.startswith("raytrain_cls."):
                target = project_module(name)
                if target != module:
                    edges[module].add(target)
    return edges


def test_the_package_is_split_into_its_layers():
    assert {m.split(".")[1] for m in MODULES if m.count(".") >= 1} == {*LAYERS, "entry", "__main__"}


def test_imports_are_absolute():
    relative = [f"{m}:{line}" for m in MODULES for name, line, _ in imports(m) if name.startswith(".")]
    assert not relative, f"relative imports hide the layer they cross: {relative}"


def test_no_layer_imports_a_layer_above_it():
    upward = [
        f"{module} (line {line}) imports {project_module(name)}"
        for module in MODULES
        for name, line, _ in imports(module)
        if name.startswith("raytrain_cls.") and layer(project_module(name)) > layer(module)
    ]
    assert not upward, "a lower layer imports a higher one:\n" + "\n".join(upward)


def test_no_import_cycles_even_through_imports_inside_functions():
    edges = project_edges()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_ray_free_layers_never_import_ray():
    found = [
        f"{module}:{line} imports {name}"
        for module in MODULES
        if layer(module) <= LAYERS.index("data") and module not in RAY_ALLOWED_IN_RAY_FREE_LAYERS
        for name, line, _ in imports(module)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not found, found


def test_the_checker_sees_what_it_must_fail_on():
    """The checks above would fail on a real violation: an upward import inside a function, and a cycle."""
    assert layer("raytrain_cls.core.config") < layer("raytrain_cls.run.driver") < layer("raytrain_cls.entry")
    assert project_module("raytrain_cls.bench.step") == "raytrain_cls.bench.step"
    assert project_module("raytrain_cls.data.DataError") == "raytrain_cls.data"
    # every data module but ray_data is inside the Ray-free rule; the run side imports Ray
    assert any(name.startswith("ray") for name, _, _ in imports("raytrain_cls.run.driver"))


# ---- each module on its own, in a fresh interpreter ----------------------------------------------------------
# A fork server per group: the third-party libraries are imported once, then every project module is imported in
# a forked child that has imported nothing of the project (so an import-order cycle or a missing import shows),
# and, for the Ray-free layers, in a parent that never imported Ray (so Ray pulled in transitively shows too).
FORK_SERVER = textwrap.dedent(
    """
    import importlib, json, os, sys
    for heavy in sys.argv[2].split(","):
        if heavy:
            importlib.import_module(heavy)
    assert not any(m == "raytrain_cls" or m.startswith("raytrain_cls.") for m in sys.modules)
    results = {}
    for module in sys.argv[1].split(","):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(module)
                verdict = {"ok": True, "ray": "ray" in sys.modules}
            except BaseException as e:
                verdict = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            os.write(write, json.dumps(verdict).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            results[module] = json.loads(f.read() or '{"ok": false, "error": "the child died"}')
        os.waitpid(pid, 0)
    print(json.dumps(results))
    """
)
THIRD_PARTY = "numpy,torch,torchvision,timm,PIL.Image,yaml,pyarrow.parquet"


def fresh_imports(modules: list[str], preload: str) -> dict:
    import json

    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    out = subprocess.run(
        [sys.executable, "-c", FORK_SERVER, ",".join(modules), preload],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the fork server needs os.fork")
def test_every_module_imports_alone_and_the_ray_free_layers_pull_in_no_ray():
    ray_free = [m for m in MODULES if 0 <= layer(m) <= LAYERS.index("data") and m not in RAY_ALLOWED_IN_RAY_FREE_LAYERS]
    rest = [m for m in MODULES if m not in ray_free and m != "raytrain_cls.__main__"]  # __main__ runs the CLI
    results = fresh_imports(ray_free, THIRD_PARTY)
    results.update(fresh_imports(rest, THIRD_PARTY + ",ray,ray.train,ray.tune"))
    failed = {m: r["error"] for m, r in results.items() if not r["ok"]}
    assert not failed, failed
    with_ray = [m for m in ray_free if results[m]["ray"]]
    assert not with_ray, f"Ray-free modules that import Ray when imported: {with_ray}"
    assert set(results) == set(ray_free) | set(rest)
