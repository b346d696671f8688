"""The paper's ablations as config switches (ablations.py): each changes what it should and nothing
else, the models they build lack exactly the ablated branch, and noFG chains Diffusion-C's
completion into a supervised fine network."""
import types

import jax
import numpy as np
import pytest

from diffrecon_jax.configs import default
from diffrecon_jax import evaluate, nofg
from diffrecon_jax.diffrecon import ablations
from diffrecon_jax.diffrecon import model
from diffrecon_jax.baselines import supervised
from diffrecon_jax.data import coarsen
from tests import _train_helpers as helpers


def _flat(config) -> dict:
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if hasattr(v, "items"):
        walk(v, prefix + k + ".")
      else:
        out[prefix + k] = v
  walk(config.to_dict(), "")
  return out


def _changed(name: str) -> dict:
  c = default.get_config()
  c.ablation = name
  before, after = _flat(c), _flat(ablations.apply(c))
  assert set(before) == set(after)
  return {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def test_each_switch_changes_only_its_fields():
  c = default.get_config()
  t = c.train
  assert _changed("noPre") == {
      "train.steps_c": (t.steps_c, 0), "train.steps_f": (t.steps_f, 0),
      "train.steps_joint": (t.steps_joint, t.steps_c + t.steps_joint),
      "train.lr_joint_c": (t.lr_joint_c, t.lr_c), "train.lr_joint_f": (t.lr_joint_f, t.lr_f)}
  assert _changed("noJoint") == {"train.steps_joint": (t.steps_joint, 0)}
  assert _changed("noSTPointFormer") == {"model_c.use_inter": (True, False)}
  assert _changed("noTPatternNet") == {"model_f.use_inter": (True, False)}
  assert _changed("noFG") == {"train.steps_f": (t.steps_f, 0),
                              "train.steps_joint": (t.steps_joint, 0)}


def test_no_ablation_is_the_config_itself_and_the_input_is_not_modified():
  c = default.get_config()
  assert ablations.apply(c) is c
  c.ablation = "noPre"
  steps = c.train.steps_c
  ablations.apply(c)
  assert c.train.steps_c == steps


@pytest.mark.parametrize("field,value,match", [
    ("ablation", "noSomething", "unknown ablation 'noSomething'"),
    ("ablation_fine_network", "vdsr", "ablation_fine_network must be one of"),
])
def test_bad_ablation_settings_are_named(field, value, match):
  c = default.get_config()
  c.ablation = "noFG"
  c[field] = value
  with pytest.raises(ValueError, match=match):
    nofg.check_ablation(c)


def test_an_ablation_needs_the_diffrecon_method():
  c = default.get_config()
  c.ablation, c.method = "noJoint", "srcnn"
  with pytest.raises(ValueError, match="needs method='diffrecon'"):
    ablations.check(c)


def test_method_names():
  c = default.get_config()
  assert ablations.method_name(c) == "diffrecon"
  c.ablation = "noTPatternNet"
  assert ablations.method_name(c) == "diffrecon-noTPatternNet"
  c.ablation, c.ablation_fine_network = "noFG", "urbanfm"
  assert ablations.method_name(c) == "diffc-urbanfm"


def _param_names(config, task) -> set:
  models = model.build_models_for_task(config, task)
  params = jax.eval_shape(lambda k: model.init_params(models, task.shapes, k),
                          jax.random.PRNGKey(0))
  return {"/".join(str(getattr(p, "key", p)) for p in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_branch_switches_remove_exactly_their_branch():
  task = helpers.tiny_task()
  base = helpers.tiny_config()
  full = _param_names(base, task)
  names = {}
  for name in ("noSTPointFormer", "noTPatternNet"):
    c = base.copy_and_resolve_references()
    c.ablation = name
    names[name] = _param_names(ablations.apply(c), task)
  gone_c = full - names["noSTPointFormer"]
  gone_f = full - names["noTPatternNet"]
  # Parameters are only removed, and only from the ablated stage.
  assert names["noSTPointFormer"] < full and names["noTPatternNet"] < full
  assert gone_c and all(n.startswith("c/") for n in gone_c), sorted(gone_c)[:5]
  assert gone_f and all(n.startswith("f/") for n in gone_f), sorted(gone_f)[:5]
  assert any("STPointFormer" in n or "inter" in n.lower() for n in gone_c), sorted(gone_c)[:5]


def test_nofg_chains_diffusion_c_into_the_fine_network():
  """DiffC-<net>: the coarse maps are Diffusion-C's completion, the fine maps the network applied
  to that completion, trained on complete coarse maps only."""
  config = helpers.tiny_config()
  config.sampling.steps = 2
  config.ablation, config.ablation_fine_network = "noFG", "srcnn"
  b = config.baselines
  b.steps, b.batch_size, b.log_every, b.srcnn_features = 3, 8, 0, (8, 4)
  task = helpers.tiny_task()
  diffc = helpers.tiny_diffrecon(config, task)
  fine_net = nofg.fine_network(config)
  assert isinstance(fine_net, supervised.SupervisedBaseline) and fine_net.train_patterns == ()
  method = nofg.DiffCThenFine(diffc, fine_net, ablations.method_name(config))
  mask = (np.random.RandomState(0).rand(*task.coarse_valid.shape) > 0.4).astype(np.float32)
  view = evaluate.observe(task, mask)
  lo, _ = task.split.range("val")
  slices = np.arange(lo, lo + 6)
  rec = method.reconstruct(view, slices)
  assert rec["samples"] is None and method.name == "diffc-srcnn"
  np.testing.assert_allclose(rec["coarse"], diffc.complete(view, slices), rtol=1e-6)
  np.testing.assert_allclose(rec["fine"], fine_net.fine_from_coarse(view, rec["coarse"], slices),
                             rtol=1e-6)
  obs = mask[slices] > 0
  np.testing.assert_allclose(rec["coarse"][obs], task.coarse_phys[slices][obs], rtol=1e-5,
                             atol=1e-4)


def _pooled(fine: np.ndarray, n: int) -> np.ndarray:
  return coarsen.coarsen(fine, n, "sum")


@pytest.mark.parametrize("net", ["srcnn", "stcf"])
def test_nofg_on_the_base_corrects_the_prior_split(net):
  """ablation_fine_on_base: the fine network learns a correction of Diffusion-F's base (the
  prior's split of the completed map), so its fine maps pool to Diffusion-C's completion, differ
  from the base by a correction that sums to 0 in every block, and equal the base when the
  network outputs nothing. STCF checks that its pre-trained encoders reach the wrapped network."""
  config = helpers.tiny_config()
  config.sampling.steps = 2
  config.ablation, config.ablation_fine_network = "noFG", net
  b = config.baselines
  b.steps, b.batch_size, b.log_every, b.srcnn_features = 3, 8, 0, (8, 4)
  b.stcf_features, b.stcf_blocks, b.stcf_encoder_features, b.stcf_pretrain_steps = 4, 1, 4, 2
  task = helpers.tiny_task()
  diffc = helpers.tiny_diffrecon(config, task)
  assert diffc.models.fine_base is not None  # the tiny config has the climatology prior
  fine_net = nofg.fine_network(config)
  method = nofg.DiffCThenFine(diffc, fine_net, ablations.method_name(config), on_base=True)
  assert fine_net.base is not None and "prior's split" in method.sampler["stage_2"]
  mask = (np.random.RandomState(0).rand(*task.coarse_valid.shape) > 0.4).astype(np.float32)
  view = evaluate.observe(task, mask)
  lo, _ = task.split.range("val")
  slices = np.arange(lo, lo + 6)
  rec = method.reconstruct(view, slices)
  assert isinstance(fine_net.module, supervised.OnBase) and np.isfinite(fine_net.losses).all()
  n = task.scale
  base = fine_net.base(view, rec["coarse"], slices)
  np.testing.assert_allclose(_pooled(base, n), rec["coarse"], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(_pooled(rec["fine"], n), rec["coarse"], rtol=1e-4, atol=1e-3)
  correction = rec["fine"] - base
  assert np.abs(correction).max() > 1e-3  # the network moved values within blocks
  np.testing.assert_allclose(_pooled(correction, n), 0.0, atol=1e-3)
  fine_net.params = jax.tree_util.tree_map(np.zeros_like, fine_net.params)
  np.testing.assert_allclose(fine_net.fine_from_coarse(view, rec["coarse"], slices), base,
                             rtol=1e-5, atol=1e-4)


def test_nofg_off_the_base_is_the_network_alone():
  """ablation_fine_on_base False (the paper's noFG), or a model without a fine base (the paper's
  architecture): the network infers the fine map on its own."""
  config = helpers.tiny_config()
  config.ablation, config.ablation_fine_network = "noFG", "srcnn"
  diffc = helpers.tiny_diffrecon(config, helpers.tiny_task())
  fine_net = nofg.fine_network(config)
  method = nofg.DiffCThenFine(diffc, fine_net, "diffc-srcnn", on_base=False)
  assert fine_net.base is None and method.sampler["stage_2"] == "srcnn"
  no_base = types.SimpleNamespace(models=types.SimpleNamespace(fine_base=None), sampler="ddim")
  assert nofg.prior_split(no_base) is None
  fine_net = nofg.fine_network(config)
  nofg.DiffCThenFine(no_base, fine_net, "diffc-srcnn", on_base=True)
  assert fine_net.base is None
