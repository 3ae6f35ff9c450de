"""The public contract (DESIGN.md, issue 23 "The contract"): every pass imports from
``outlierfx.passes``, ``outlierfx.__all__`` is complete, importing the package is cheap and
leaves the user's warning filters alone, and docstrings name only APIs that exist."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

import outlierfx
import outlierfx.passes
from outlierfx.passes import GraphPass

ROOT = pathlib.Path(outlierfx.__file__).resolve().parent.parent
PACKAGE = ROOT / "outlierfx"


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout's outlierfx."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# --------------------------------------------------------------------------- exports

def _graph_passes() -> dict[str, type]:
    """Every public GraphPass subclass defined in a module of outlierfx/passes/."""
    found = {}
    for path in sorted((PACKAGE / "passes").glob("*.py")):
        module = importlib.import_module(_module_name(path))
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and issubclass(cls, GraphPass) and cls is not GraphPass
                    and cls.__module__ == module.__name__ and not name.startswith("_")):
                found[name] = cls
    return found


def test_every_pass_imports_from_outlierfx_passes():
    passes = _graph_passes()
    assert {"MigrateGamma", "InsertQuadapter", "TrainQuadapter", "FoldQuadapter", "Lower"} <= set(passes)
    missing = sorted(set(passes) - set(outlierfx.passes.__all__))
    assert not missing, f"add to outlierfx.passes: {missing}"
    for name, cls in passes.items():
        assert getattr(outlierfx.passes, name) is cls
    namespace: dict[str, object] = {}
    exec("from outlierfx.passes import *", namespace)
    assert set(passes) <= set(namespace)


def test_every_name_in_all_resolves():
    for package in (outlierfx, outlierfx.passes):
        assert len(set(package.__all__)) == len(package.__all__)
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
        assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError):
        getattr(outlierfx, "no_such_name")
    with pytest.raises(AttributeError):
        getattr(outlierfx.passes, "NoSuchPass")


def _referenced_package_names() -> set[str]:
    """``outlierfx.<name>`` as written in the README, the package's and the tests' sources (not
    ``torch.ops.outlierfx.<op>``: the namespace of our registered torch ops)."""
    names = set()
    sources = [ROOT / "README.md", *PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    for path in sources:
        names |= set(re.findall(r"(?<!ops\.)\boutlierfx\.([A-Za-z_]\w*)", path.read_text()))
    return {name for name in names - FILE_SUFFIXES if not name.startswith("__")}


def test_all_covers_the_public_api():
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    public = set(outlierfx.__all__)
    # the contract's entry points, and the types and errors they return or raise
    assert {"capture", "quantize", "lower", "QuantizationReport", "QuantizationResult", "compile_int8",
            "save", "load"} <= public
    for module in (outlierfx.api, outlierfx.errors):
        defined = {name for name, value in vars(module).items()
                   if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}
        assert defined <= public, f"{module.__name__} defines {sorted(defined - public)} outside outlierfx.__all__"
    used = _referenced_package_names() - submodules
    assert not used - public, f"used as outlierfx.<name> but not in __all__: {sorted(used - public)}"


# --------------------------------------------------------------------------- import side effects

def test_import_does_not_load_torch_or_transformers():
    result = _run_python(
        "import sys, outlierfx, outlierfx.passes\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from outlierfx.passes import MigrateGamma\n"
        "assert 'torch' in sys.modules\n")
    assert result.returncode == 0, result.stderr


def _third_party_imports() -> list[str]:
    """Every module outside outlierfx that some outlierfx module imports (at any depth)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return sorted(name for name in found if name.split(".")[0] not in ("outlierfx", "__future__"))


def test_importing_every_module_leaves_warning_filters_alone():
    # torch, numpy and sympy install filters of their own when imported: import every third-party
    # module outlierfx uses first, so the comparison sees only what outlierfx adds.
    result = _run_python(
        "import importlib, pkgutil, warnings\n"
        f"for name in {_third_party_imports()!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        pass  # an optional extra that is not installed\n"
        "before = list(warnings.filters)\n"
        "import outlierfx, outlierfx.passes\n"
        "names = [m.name for m in pkgutil.walk_packages(outlierfx.__path__, 'outlierfx.')\n"
        "         if not m.name.endswith('__main__')]  # running the CLI is not importing it\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "assert warnings.filters == before, f'filters added by importing outlierfx: {added}'\n"
        "print(len(names))\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 30  # really walked the package


# --------------------------------------------------------------------------- docstrings

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`<>]+?)`")
DOTTED = re.compile(r"(?<!ops\.)\boutlierfx(?:\.[A-Za-z_]\w*)+")  # not torch.ops.outlierfx.<op>
FILE_SUFFIXES = {"json", "html", "pt", "py", "md", "log"}  # ``outlierfx.json`` names a file, not an API


def _resolve(dotted: str) -> object:
    """The object ``a.b.c`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise ModuleNotFoundError(dotted)


def _resolves_in(module: object, target: str) -> bool:
    """Sphinx-style lookup of a role's target written in ``module``: relative module names,
    the module's namespace, then members of the classes it defines."""
    try:
        if target.startswith("."):
            package = module.__name__ if hasattr(module, "__path__") else module.__name__.rsplit(".", 1)[0]
            _resolve(package + target)
        elif target.startswith("outlierfx."):
            _resolve(target)
        else:
            head, *rest = target.split(".")
            if head not in vars(module) and "__getattr__" in vars(module):
                getattr(module, head, None)  # a lazy package (PEP 562) binds the name on first use
            namespaces = [vars(module)] + [vars(c) for c in vars(module).values() if inspect.isclass(c)]
            owner = next(ns[head] for ns in namespaces if head in ns)
            for attr in rest:
                owner = getattr(owner, attr)
        return True
    except (AttributeError, ImportError, StopIteration):
        return False


def _prose(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, text) of every string and comment in a Python file: docstrings, comments, messages."""
    kinds = {tokenize.STRING, tokenize.COMMENT}
    with tokenize.open(path) as f:
        return [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(f.readline) if tok.type in kinds]


def _references(text: str) -> list[tuple[int, str]]:
    """(line offset in ``text``, name) of every Sphinx role target and dotted ``outlierfx.<module>`` name."""
    matches = [(m.start(), m.group(1).strip()) for m in ROLE.finditer(text)]
    matches += [(m.start(), m.group(0)) for m in DOTTED.finditer(text)
                if m.group(0).rsplit(".", 1)[-1] not in FILE_SUFFIXES]
    return sorted({(text.count("\n", 0, start), name) for start, name in matches})


def test_docstrings_and_comments_name_only_apis_that_exist():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":  # importing it runs the CLI; it has no prose
            continue
        module = importlib.import_module(_module_name(path))
        for line, text in _prose(path):
            for offset, target in _references(text):
                if not _resolves_in(module, target):
                    broken.append(f"{path.relative_to(ROOT)}:{line + offset}: {target}")
    readme = ROOT / "README.md"
    for offset, ref in _references(readme.read_text()):
        if ref.startswith("outlierfx.") and not _resolves_in(outlierfx, ref):
            broken.append(f"README.md:{offset + 1}: {ref}")
    assert not broken, "references to APIs that do not exist:\n" + "\n".join(broken)


def test_reference_check_catches_a_missing_name():
    # the checks above pass vacuously if resolution never fails
    import outlierfx.passes.quadapter  # noqa: F401  (a lazy package's submodule: loaded here, not by test order)

    assert _resolves_in(outlierfx.passes.quadapter, "InsertQuadapter")
    assert _resolves_in(outlierfx.passes.quadapter, ".fold_quadapter")
    assert _resolves_in(outlierfx.passes.quadapter, "outlierfx.passes.train_quadapter.TrainQuadapter")
    assert not _resolves_in(outlierfx.passes.quadapter, "outlierfx.passes.quadapter.TrainQuadapter")
    assert not _resolves_in(outlierfx.passes.quadapter, "NoSuchName")
    assert not _resolves_in(outlierfx.passes.quadapter, ".no_such_module")
    assert _references("see outlierfx.json and\n:func:`~outlierfx.graph.meta.module_path` (node)") == [
        (1, "outlierfx.graph.meta.module_path")]

