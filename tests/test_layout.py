"""The layout rules of DESIGN.md, checked on the source: data flows one way and there are no import circles."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chatexaonepath"

# stage (a sub-package or a root module) → stages it must never import, even lazily inside a function
FORBIDDEN = {
    # the tower knows no LLM; no production stage imports the synthetic world (tests, demo and benches use it)
    "vision_tower": {"chat", "train", "raider", "eval", "webapp", "backends", "llm", "synthetic"},
    "backends": {"chat", "train", "raider", "eval", "webapp", "synthetic"},  # text backends never import the chat model
    "raider": {"chat", "train", "eval", "webapp", "synthetic"},
    "chat": {"train", "webapp", "raider", "eval", "synthetic"},  # inference never imports training
    "train": {"webapp", "eval", "synthetic"},
    # (it reads raider's question bank for its example questions; it serves the demo model, built lazily)
    "webapp": {"train", "eval"},
    "eval": {"train", "webapp", "synthetic"},  # (it reuses raider's chunker and embedder for long reports)
    "synthetic": {"webapp"},  # the synthetic world builds on the stages, never on the page
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported chatexaonepath module, imported at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    top_level = {id(node) for node in tree.body}
    type_checking = {id(child) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                     for child in ast.walk(node)}
    for node in ast.walk(tree):
        at_top = id(node) in top_level or id(node) in type_checking
        if isinstance(node, ast.Import):
            found += [(alias.name, at_top) for alias in node.names if alias.name.startswith("chatexaonepath")]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("chatexaonepath"):
                found += [(target, at_top)]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("source", sorted(FORBIDDEN))
def test_stages_do_not_import_what_design_forbids(source):
    bad = [f"{module} imports {target}" for module, targets in graph().items() if stage(module) == source
           for target, _ in targets if stage(target) in FORBIDDEN[source]]
    assert not bad, bad


def test_no_import_circles_at_module_level():
    edges = {module: {t for t, top in targets if top and t != module} for module, targets in graph().items()}
    edges = {m: {t for t in ts if t in edges} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    # a package's __init__ importing its own submodules is not a circle of ideas
    cycles = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not cycles, cycles
