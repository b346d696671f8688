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


def layers() -> dict:
  """{entry: (layer number, layer name)} from WORKSPACE.md's "Layers" block: lines
  `layer N  NAME  entry entry ...`, an entry a module or package under diffrecon_jax."""
  text = (REPO_ROOT / "WORKSPACE.md").read_text()
  out = {}
  for line in text.splitlines():
    if line.startswith("layer "):
      _, number, name, *entries = line.split()
      for entry in entries:
        out[entry] = (int(number), name)
  return out


def layer_of(module: str, table: dict) -> tuple:
  """The layer of `module` (dotted, under diffrecon_jax): its longest matching entry."""
  rel = module[len(PACKAGE) + 1:] if module != PACKAGE else PACKAGE
  parts = rel.split(".")
  for k in range(len(parts), 0, -1):
    if ".".join(parts[:k]) in table:
      return table[".".join(parts[:k])]
  raise AssertionError(f"{module} is in no layer of WORKSPACE.md's Layers block: place it")


# Peers of one layer that must not import each other (WORKSPACE.md): the model and the baselines.
SEPARATE = (("diffrecon_jax.baselines", "diffrecon_jax.diffrecon"),)


def layer_violations(graph: dict, table: dict) -> list:
  """["a (layer) imports b (higher layer)"] for every import against the layers."""
  bad = []
  for module, imports in sorted(graph.items()):
    mine = layer_of(module, table)
    for target in sorted(imports):
      theirs = layer_of(target, table)
      if theirs[0] > mine[0]:
        bad.append(f"{module} ({mine[1]}) imports {target} ({theirs[1]})")
      for a, b in SEPARATE:
        for x, y in ((a, b), (b, a)):
          if (module == x or module.startswith(x + ".")) and (
              target == y or target.startswith(y + ".")):
            bad.append(f"{module} imports {target}: {x} and {y} never import each other")
  return bad


def test_the_layer_checker_finds_an_upward_import():
  table = {"data": (2, "data"), "run": (5, "apps"), "baselines": (4, "methods"),
           "diffrecon": (4, "methods")}
  graph = {"diffrecon_jax.data.x": {"diffrecon_jax.run"},
           "diffrecon_jax.baselines.b": {"diffrecon_jax.diffrecon.model"},
           "diffrecon_jax.run": {"diffrecon_jax.data.x"}}
  assert layer_violations(graph, table) == [
      "diffrecon_jax.baselines.b imports diffrecon_jax.diffrecon.model: diffrecon_jax.baselines "
      "and diffrecon_jax.diffrecon never import each other",
      "diffrecon_jax.data.x (data) imports diffrecon_jax.run (apps)"]


def test_imports_follow_the_layers_written_in_workspace():
  table = layers()
  assert table["data"][0] < table["diffrecon"][0] == table["baselines"][0] < table["run"][0]
  bad = layer_violations(import_graph(), table)
  assert not bad, "\n".join(bad)
