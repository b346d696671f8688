"""A damaged checkpoint (truncated metadata, a missing array file) is reported with its path and
the previous readable one is used, when resuming training and when loading for sampling; with
none left, CheckpointError names the step directory and what to do.

Training runs in-process with the stand-in denoisers of _train_helpers (the checkpoint logic is
model-agnostic): stage_c 2, stage_f 2, joint 4 steps, a checkpoint every 2 steps, 2 kept, so
joint/ holds steps 2 (unfinished) and 4 (finished). About 20 s on 2 cores.
"""
import logging
import shutil

import jax
import numpy as np
import pytest

from diffrecon_jax.diffrecon import train

from diffrecon_jax.diffrecon import checkpoints

from diffrecon_jax.diffrecon import loading
from tests import _train_helpers as helpers

STEPS = (2, 2, 4)


def _train(workdir):
  config = helpers.tiny_config(steps=STEPS)
  task = helpers.tiny_task()
  return train.train(config, str(workdir), task=task,
                     models=helpers.standin_models(config, task.scale))


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _truncate_meta(step_dir):
  meta = step_dir / "meta" / "metadata"
  meta.write_text(meta.read_text()[:30])


def _delete_array_file(step_dir):
  files = sorted((step_dir / "state" / "d").iterdir())
  assert files, step_dir
  files[0].unlink()


DAMAGES = {"truncated_metadata": _truncate_meta, "missing_array_file": _delete_array_file}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("fallback")
  out = _train(root / "ref")
  assert sorted(p.name for p in (root / "ref" / "joint").iterdir()) == ["2", "4"]
  return root, _flat(out["state"].params)


def _load(workdir):
  return loading.load_for_sampling(str(workdir), build_models=helpers.standin_models)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_to_the_previous_checkpoint(trained, tmp_path, caplog, damage):
  root, ref_params = trained
  wd = tmp_path / "wd"
  shutil.copytree(root / "ref", wd)
  DAMAGES[damage](wd / "joint" / "4")
  with caplog.at_level(logging.INFO):
    out = _train(wd)
  text = caplog.text
  assert f"[joint] checkpoint {wd / 'joint' / '4'} cannot be read" in text, text
  assert "[joint] resuming from step 2/4" in text
  moved = wd / checkpoints.DAMAGED_DIR / "joint" / "4"
  assert moved.is_dir() and f"moved the damaged checkpoint to {moved}" in text
  assert out["phases"]["joint"]["start_step"] == 2 and not out["phases"]["joint"]["skipped"]
  # steps 3-4 redone from step 2 reach the parameters of the undamaged run.
  for k, v in _flat(out["state"].params).items():
    np.testing.assert_allclose(v, ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert sorted(p.name for p in (wd / "joint").iterdir()) == ["2", "4"]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_sampling_falls_back_to_the_previous_finished_checkpoint(trained, tmp_path, caplog,
                                                                  damage):
  root, _ = trained
  wd = tmp_path / "wd"
  shutil.copytree(root / "ref", wd)
  DAMAGES[damage](wd / "joint" / "4")
  with caplog.at_level(logging.INFO):
    _, _, _, meta = _load(wd)
  # joint/2 is readable but unfinished: the newest finished readable one is stage_f's.
  assert meta["phase"] == "stage_f" and meta["finished"] and meta["step"] == 2
  assert f"[joint] checkpoint {wd / 'joint' / '4'} cannot be read" in caplog.text
  assert f"using stage_f step 2 instead of the damaged {wd / 'joint' / '4'}" in caplog.text


def test_no_readable_checkpoint_is_a_clear_error(trained, tmp_path):
  root, _ = trained
  wd = tmp_path / "wd"
  shutil.copytree(root / "ref", wd)
  for phase in ("stage_c", "stage_f"):
    _truncate_meta(wd / phase / "2")
  _delete_array_file(wd / "joint" / "4")
  with pytest.raises(checkpoints.CheckpointError) as err:
    _load(wd)
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith(f"checkpoint {wd / 'joint' / '4'} is damaged (")
  assert "delete that step directory" in msg and "retrain" in msg
  # Resuming: stage_c has no readable step at all: delete the phase directory.
  with pytest.raises(checkpoints.CheckpointError) as err:
    _train(wd)
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith(f"checkpoint {wd / 'stage_c' / '2'} is damaged (")
  assert "JSONDecodeError" in msg and f"delete {wd / 'stage_c'}" in msg


def test_an_intact_workdir_is_read_without_warnings(trained, caplog):
  root, _ = trained
  with caplog.at_level(logging.WARNING, logger="absl"):
    _, _, _, meta = _load(root / "ref")
  assert meta["phase"] == "joint" and meta["step"] == 4
  assert "cannot be read" not in caplog.text
