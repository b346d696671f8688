"""Tests of diffrecon_jax/diffrecon/train.py: optimizers per phase, the joint step, EMA, NaN detection.

The training logic is model-agnostic, so these use the stand-in denoisers of _train_helpers
(the real ones compile for about a minute on 2 cores; test_resume / test_parallel run them).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrecon_jax import parallel

from diffrecon_jax.diffrecon import checkpoints
from diffrecon_jax.diffrecon import model
from diffrecon_jax.diffrecon import settings
from diffrecon_jax.diffrecon import train
from tests import _train_helpers as helpers


def _tree_max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def joint_setup():
  """A compiled one-step joint train step (stand-in denoisers) with w_c = 0, no weight decay.

  With w_c = 0 Diffusion-C's only gradient comes from L_F through the completed window, so any
  change of its parameters shows grad L_F w.r.t. the 'c' params is non-zero.
  """
  config = helpers.tiny_config()
  config.train.joint_weight_c = 0.0
  config.train.weight_decay = 0.0
  task = helpers.tiny_task()
  models = helpers.standin_models(config, task.scale)
  mesh = parallel.make_mesh()
  params = jax.jit(lambda k: model.init_params(models, task.shapes, k))(jax.random.PRNGKey(0))
  tc = settings.TrainSettings.from_config(config)
  opt = train.make_optimizer("joint", tc)
  spec = train.BatchSpec.from_task(config, task)
  joint = train.joint_settings(tc, task)
  assert joint.weight_c == 0.0
  step_fn = train.make_train_step("joint", models, opt, tc, spec, mesh, 1, joint)
  arrays = parallel.put_replicated(task.device_arrays(), mesh)

  def fresh_state():
    return train.phase_start_state(opt, jax.tree_util.tree_map(jnp.copy, params),
                                   jax.tree_util.tree_map(jnp.copy, params),
                                   jax.random.PRNGKey(1))

  return config, task, params, step_fn, arrays, fresh_state


def test_optimizer_freezes_the_other_stage_in_pretraining():
  params = {"c": {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}, "f": {"w": jnp.ones((4,))}}
  grads = jax.tree_util.tree_map(lambda p: 0.5 * jnp.ones_like(p), params)
  cfg = settings.TrainSettings.from_config(helpers.tiny_config())
  for phase, frozen, trained in (("stage_c", "f", "c"), ("stage_f", "c", "f"),
                                 ("joint", None, "cf")):
    opt = train.make_optimizer(phase, cfg)
    updates, _ = opt.update(grads, opt.init(params), params)
    for name in "cf":
      norm = float(jnp.sqrt(sum(jnp.sum(u ** 2) for u in jax.tree_util.tree_leaves(updates[name]))))
      if name == frozen:
        assert norm == 0.0, f"{phase}: '{name}' must be frozen, update norm {norm}"
      else:
        assert name in trained and norm > 0.0, f"{phase}: '{name}' must train"


def test_joint_step_trains_both_models_through_loss_f_and_updates_ema(joint_setup):
  config, _, params, step_fn, arrays, fresh_state = joint_setup
  before = jax.tree_util.tree_map(np.asarray, params)
  state, metrics = step_fn(fresh_state(), arrays)
  assert int(state.step) == 1
  assert set(metrics) == {"loss", "loss_c", "loss_f", "grad_norm"}
  assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())
  # w_c = 0: the total is L_F alone, and C moved only because grad L_F reached it.
  np.testing.assert_allclose(metrics["loss"], metrics["loss_f"], rtol=1e-6)
  assert _tree_max_abs_diff(state.params["c"], before["c"]) > 0, "grad of L_F did not reach C"
  assert _tree_max_abs_diff(state.params["f"], before["f"]) > 0
  # EMA: ema_1 = d * ema_0 + (1 - d) * params_1 with ema_0 = params_0 and d the decay of the
  # phase's first update (`ema_decay_at`: 0.1 with the warm-up, ema_decay without).
  d = float(train.ema_decay_at(jnp.zeros((), jnp.int32), float(config.train.ema_decay),
                               bool(config.train.ema_warmup)))
  expected = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * np.asarray(p), before,
                                    state.params)
  assert _tree_max_abs_diff(state.ema_params, expected) < 1e-6
  assert _tree_max_abs_diff(state.ema_params, state.params) > 0


def test_ema_warmup_forgets_the_initial_parameters_of_a_short_phase():
  steps = jnp.asarray([0, 1, 90, 8990, 100000], jnp.int32)
  warm = np.asarray(jax.vmap(lambda t: train.ema_decay_at(t, 0.999, True))(steps))
  np.testing.assert_allclose(warm, [0.1, 2 / 11, 0.91, 0.999, 0.999], rtol=1e-6)
  plain = np.asarray(jax.vmap(lambda t: train.ema_decay_at(t, 0.999, False))(steps))
  np.testing.assert_allclose(plain, 0.999, rtol=1e-7)
  # What is left of the initial parameters after 2,000 updates: 0.14 without, ~0 with.
  left = lambda warmup: float(np.prod(jax.vmap(
      lambda t: train.ema_decay_at(t, 0.999, warmup))(jnp.arange(2000))))
  assert left(False) == pytest.approx(0.999 ** 2000, rel=1e-3)
  assert left(True) < 1e-3


def test_cosine_rate_falls_from_the_phase_rate_to_a_tenth_over_the_phase():
  cfg = helpers.tiny_config(steps=(20, 10, 4))
  cfg.train.lr_schedule = "cosine"
  cfg.train.grad_clip = 0.0
  cfg.train.weight_decay = 0.0
  tc = settings.TrainSettings.from_config(cfg)
  schedule = train.learning_rate(1e-3, 20, "cosine")
  np.testing.assert_allclose([schedule(0), schedule(10), schedule(20), schedule(30)],
                             [1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5)
  assert train.learning_rate(1e-3, 20, "constant") == 1e-3
  # Adam's first update has size lr per parameter: the schedule reaches the optimizer, and the
  # optimizer's own count (checkpointed) drives it.
  params = {"c": {"w": jnp.ones((3,))}, "f": {"w": jnp.ones((2,))}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  opt = train.make_optimizer("stage_c", tc)
  state = opt.init(params)
  sizes = []
  for _ in range(20):
    updates, state = opt.update(grads, state, params)
    sizes.append(float(jnp.abs(updates["c"]["w"][0])))
  assert sizes[0] == pytest.approx(float(cfg.train.lr_c), rel=1e-3)
  assert sizes[-1] < 0.2 * sizes[0]
  assert all(a >= b for a, b in zip(sizes, sizes[1:]))
  cfg.train.lr_schedule = "linear"
  with pytest.raises(ValueError, match="train.lr_schedule must be one of"):
    settings.TrainSettings.from_config(cfg)


def test_complete_current_fills_only_missing_current_cells():
  window = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8, 6, 2)), jnp.float32)
  mask = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 3, 8, 6)) > 0.5, jnp.float32)
  x0_hat = jnp.full((2, 8, 6, 2), 7.0)
  batch = {"coarse": window, "obs": window * mask[..., None], "mask": mask}
  out = model.complete_current(batch, x0_hat)
  np.testing.assert_array_equal(out[:, :-1], window[:, :-1])  # history stays pseudo-complete.
  m = mask[:, -1, ..., None]
  np.testing.assert_allclose(out[:, -1], m * window[:, -1] + (1 - m) * 7.0)
  clipped = model.complete_current(batch, x0_hat, clip=5.0)
  np.testing.assert_allclose(clipped[:, -1], m * window[:, -1] + (1 - m) * 5.0)


def test_non_finite_loss_raises_naming_phase_step_and_loss(joint_setup):
  _, task, _, step_fn, arrays, fresh_state = joint_setup
  bad = dict(arrays, fine=jnp.full_like(arrays["fine"], jnp.nan))
  _, metrics = step_fn(fresh_state(), bad)  # same shapes: no recompile.
  with pytest.raises(FloatingPointError, match=r"non-finite loss_f .* phase joint at step 8"):
    train.check_finite("joint", 7, parallel.to_host(metrics))
  # Located to the exact fused step, component loss named before the total.
  metrics = {"loss": np.array([1.0, np.inf, np.nan]), "loss_c": np.array([1.0, 2.0, np.nan])}
  with pytest.raises(FloatingPointError,
                     match=r"non-finite loss \(inf\) in phase stage_c at step 2"):
    train.check_finite("stage_c", 0, metrics)
  train.check_finite("stage_c", 0, {"loss": np.ones(3), "loss_c": np.ones(3)})  # finite: quiet.


def test_chunks_end_on_checkpoint_and_log_steps():
  plan, step = [], 0
  while step < 23:
    n = train.chunk_size(step, 23, 4, 10, 5)
    plan.append(n)
    step += n
  assert plan == [4, 1, 4, 1, 4, 1, 4, 1, 3]
  # Resuming at a checkpoint step (10) makes the same calls as the uninterrupted run.
  resumed, step = [], 10
  while step < 23:
    n = train.chunk_size(step, 23, 4, 10, 5)
    resumed.append(n)
    step += n
  assert resumed == plan[4:]


def test_config_round_trips_through_json():
  config = helpers.tiny_config()
  back = checkpoints.config_from_json(config.to_json())
  assert back.model_c.channel_mults == (1,)
  assert back.patterns.train == tuple(config.patterns.train)
  assert back.train.steps_joint == config.train.steps_joint


def test_file_training_patterns_reach_the_compiled_step(tmp_path):
  """A `file:` training pattern (a fixed sensor layout) hides the layout's cells in the batches
  the compiled step draws: its layouts are passed to the mask sampler, not dropped."""
  import dataclasses

  from diffrecon_jax.data import patterns as patterns_lib
  from diffrecon_jax.data import pipeline

  config = helpers.tiny_config()
  task = helpers.tiny_task()
  layout = np.zeros(task.coarse_shape, np.float32)
  layout[:, : task.coarse_shape[1] // 3] = 1.0  # a third of the columns observed
  path = tmp_path / "layout.npy"
  np.save(path, layout)
  task = dataclasses.replace(task, patterns_train=(patterns_lib.parse_pattern(f"file:{path}"),))
  spec = train.BatchSpec.from_task(config, task)
  assert len(spec.patterns) == 3
  seen = []

  def recording_sampler(arrays, rng, **kw):
    assert len(kw["patterns"]) == 3, "the layouts were dropped"
    batch = pipeline.sample_train_batch(arrays, rng, **kw)
    jax.debug.callback(lambda m: seen.append(float(m)), batch["mask"][:, -1].mean())
    return batch

  models = helpers.standin_models(config, task.scale)
  mesh = parallel.make_mesh()
  params = model.init_params(models, task.shapes, jax.random.PRNGKey(0))
  tc = settings.TrainSettings.from_config(config)
  opt = train.make_optimizer("stage_c", tc)
  step_fn = train.make_train_step("stage_c", models, opt, tc, spec, mesh, 1,
                                  sample_batch=recording_sampler)
  state = train.phase_start_state(opt, params, jax.tree_util.tree_map(jnp.copy, params),
                                  jax.random.PRNGKey(1))
  jax.block_until_ready(step_fn(state, parallel.put_replicated(task.device_arrays(), mesh)))
  assert seen and abs(seen[0] - layout.mean()) < 0.05, seen


def test_compiling_ahead_changes_nothing_and_later_phases_use_it(tmp_path, monkeypatch):
  """`train.compile_ahead`: stage_f's and joint's steps, compiled on the background thread while
  stage_c trains, are the ones those phases call, and the run ends with the same parameters and
  losses as a run that compiles each step at its phase's start."""
  task = helpers.tiny_task()
  taken = {}
  original = train._CompileAhead.take

  def spy(self, phase):
    got = original(self, phase)
    taken[phase] = sorted(got)
    return got
  monkeypatch.setattr(train._CompileAhead, "take", spy)
  runs = {}
  for ahead in (False, True):
    config = helpers.tiny_config(steps=(3, 3, 3), steps_per_call=1, checkpoint_every=0)
    config.train.compile_ahead = ahead
    models = helpers.standin_models(config, task.scale)
    out = train.train(config, str(tmp_path / f"ahead_{ahead}"), task=task, models=models)
    runs[ahead] = (parallel.to_host(out["state"].params),
                   [json.loads(line)["loss"] for line in
                    (tmp_path / f"ahead_{ahead}" / "metrics.jsonl").read_text().splitlines()])
  # Each later phase took a compiled step for its first call (1 step per call).
  assert taken == {"stage_f": [1], "joint": [1]}
  assert _tree_max_abs_diff(runs[True][0], runs[False][0]) == 0.0
  assert runs[True][1] == runs[False][1]
