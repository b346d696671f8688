"""Packaging: the wheel built from pyproject.toml holds the package, its configs and the data it
ships, the licence and the accelerator extras, and no top-level `configs` module; the configs are
found from the repository's configs/ link and from the installed package alike."""
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  """The wheel of this checkout, built offline with the installed setuptools from a copy of
  its files (git's list, as launch/tpu_vm.sh packs them: setuptools leaves build/ behind)."""
  out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
  subprocess.run(f"git ls-files -z --cached --others --exclude-standard | tar cf - --null -T - "
                 f"| tar xf - -C {src}", shell=True, check=True, cwd=REPO)
  subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                  "--no-build-isolation", "-q", "-w", str(out)], check=True, cwd=out)
  (path,) = out.glob("diffrecon_jax-*.whl")
  return zipfile.ZipFile(path)


def test_wheel_holds_the_package_and_its_configs_but_no_top_level_configs(wheel):
  names = wheel.namelist()
  tops = {n.split("/")[0] for n in names}
  assert {t for t in tops if not t.endswith(".dist-info")} == {"diffrecon_jax"}, tops
  for f in ("diffrecon_jax/configs/default.py", "diffrecon_jax/configs/nytaxi.py",
            "diffrecon_jax/configs/custom.py", "diffrecon_jax/configs/__main__.py"):
    assert f in names, f
  assert any(n.startswith("diffrecon_jax/data/embedded/") for n in names)
  assert not any("/tests/" in n or n.startswith("tests/") for n in names)


def test_wheel_metadata_licence_and_extras(wheel):
  meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
  meta = wheel.read(meta_name).decode()
  assert "License-Expression: Apache-2.0" in meta
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
  for extra, dep in (("tpu", "jax[tpu]"), ("cuda12", "jax[cuda12]")):
    assert f"Provides-Extra: {extra}" in meta
    assert f'{dep}>=' in meta and f'extra == "{extra}"' in meta
  import diffrecon_jax
  assert f"Version: {diffrecon_jax.__version__}" in meta


def test_repository_configs_link_is_the_package_folder():
  link = REPO / "configs"
  assert link.is_symlink() and link.resolve() == (REPO / "diffrecon_jax" / "configs").resolve()
  out = subprocess.run([sys.executable, "-m", "diffrecon_jax.configs"], capture_output=True,
                       text=True, check=True, cwd="/")
  folder = pathlib.Path(out.stdout.strip())
  assert (folder / "nytaxi.py").is_file() and folder.resolve() == link.resolve()


def test_citation_names_the_paper_and_the_licence():
  text = (REPO / "CITATION.cff").read_text()
  assert "cff-version: 1.2.0" in text and "license: Apache-2.0" in text
  assert "A Two-Stage Framework for" in text and "Spatiotemporal Data Reconstruction" in text
  import diffrecon_jax
  assert f"version: {diffrecon_jax.__version__}" in text
