"""Shared pytest fixtures.

The real data lives in `../shared/data` beside the checkout (CI lays it out the same way);
`DIFFRECON_SHARED_DATA` overrides the location.
"""
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("DIFFRECON_SHARED_DATA",
                                          REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.fail(f"real data folder not found at {SHARED_DATA}; set DIFFRECON_SHARED_DATA")
  return SHARED_DATA
