"""Structure report of the package: import cycles, module sizes, long functions, function-level imports.

    python scripts/structure.py [--json]

Used for issue #10's before/after figures and by tests/test_structure.py (the same checks).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import grimp

PACKAGE = "minimax_m3_mlx"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def modules():
    """(dotted name, path) of every module of the package."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def function_sizes(tree):
    """(qualified name, lines) of every function, methods included."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((name, child.end_lineno - child.lineno + 1, child.lineno))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def function_level_imports(tree):
    """Import statements inside functions: (line, names)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    mod = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                    level = "." * getattr(sub, "level", 0)
                    out.append((sub.lineno, f"{level}{mod or ''}"))
    return sorted(set(out))


def cycles(graph):
    """Strongly connected components (more than one module) of the package's import graph."""
    mods = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in mods}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in mods:
        if m not in index:
            strong(m)
    return out, sum(len(v) for v in edges.values())


def report():
    graph = grimp.build_graph(PACKAGE, include_external_packages=False)
    comps, n_edges = cycles(graph)
    sizes, funcs, imports = {}, [], {}
    for name, path in modules():
        text = path.read_text()
        sizes[name] = len(text.splitlines())
        tree = ast.parse(text)
        funcs += [(f"{name}.{f}", n, line) for f, n, line in function_sizes(tree)]
        fl = function_level_imports(tree)
        if fl:
            imports[name] = fl
    funcs.sort(key=lambda f: -f[1])
    return {
        "modules": len(sizes), "import_edges": n_edges, "cycles": comps,
        "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "longest_functions": funcs[:10],
        "function_level_imports": sum(len(v) for v in imports.values()),
        "function_level_imports_by_module": imports,
    }


def main():
    r = report()
    if "--json" in sys.argv:
        print(json.dumps(r, indent=1))
        return
    print(f"{r['modules']} modules, {r['import_edges']} internal import edges")
    print(f"import cycles: {len(r['cycles'])}")
    for c in r["cycles"]:
        print("  " + " <-> ".join(c))
    print("largest modules:")
    for name, n in list(r["sizes"].items())[:8]:
        print(f"  {n:5d}  {name}")
    print("longest functions:")
    for name, n, _ in r["longest_functions"][:6]:
        print(f"  {n:5d}  {name}")
    print(f"function-level imports: {r['function_level_imports']}")
    for m, items in r["function_level_imports_by_module"].items():
        print(f"  {m}: " + ", ".join(i for _, i in items))


if __name__ == "__main__":
    main()
