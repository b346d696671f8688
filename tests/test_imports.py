"""Data flows one way: no module of the package imports one that imports it back.

Every `import` counts, at module level or inside a function (a local import only hides a cycle).
"""
import ast
import pathlib

from tests.conftest import REPO_ROOT

PACKAGE = "diffrecon_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def import_graph() -> dict:
  """module -> set of package modules it imports (anywhere in its source)."""
  files = {_module_name(p): p for p in (REPO_ROOT / PACKAGE).rglob("*.py")}
  graph = {name: set() for name in files}
  for name, path in files.items():
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          anchor = name.split(".") if is_package else name.split(".")[:-1]
          anchor = anchor[:len(anchor) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      for t in targets:
        if t in files and t != name:
          graph[name].add(t)
  return graph


def find_cycle(graph: dict):
  """A list of modules forming an import cycle, or None."""
  state = {}
  stack = []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_checker_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
  graph = import_graph()
  assert len(graph) > 20 and "diffrecon_jax.data.pipeline" in graph
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
