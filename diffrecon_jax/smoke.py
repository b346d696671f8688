"""The smoke form of a config: every method a few steps on a few slices.

Shared by the command-line programs that offer `--smoke` (`experiments`, `short_series`): a
minutes-long check of the whole pipeline, not a result.
"""
from __future__ import annotations

import ml_collections


def smoke_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` shrunk so every method runs a few steps on a few slices (a minutes-long check of
  the whole pipeline, not a result): the smallest networks, 4 steps per phase, 8 evaluated
  slices, three patterns."""
  c = config.copy_and_resolve_references()
  c.data.history = 2
  c.patterns.eval = ("fixed:0.4", "random:0.4", "large_scale:0.25")
  c.patterns.train = ("random:0.4", "large_scale:0.25")
  c.diffusion.num_steps = 10
  for m in (c.model_c, c.model_f):
    m.base_channels, m.channel_mults, m.emb_dim, m.d_model, m.inter_dim = 8, (1,), 8, 8, 8
  c.model_c.num_heads, c.model_c.ff_dim = 2, 8
  c.model_f.d_ff, c.model_f.top_k, c.model_f.num_blocks, c.model_f.num_kernels = 8, 1, 1, 1
  t = c.train
  t.batch_size, t.steps_c, t.steps_f, t.steps_joint = 8, 4, 4, 4
  t.checkpoint_every = t.log_every = 4
  t.steps_per_call = 2
  c.sampling.steps, c.sampling.n_samples = 2, 2
  c.eval.max_slices, c.eval.batch_size = 8, 8
  b = c.baselines
  b.steps, b.batch_size, b.log_every = 4, 8, 0
  b.srcnn_features = (8, 4)
  b.srresnet_features, b.srresnet_blocks = 8, 1
  b.urbanfm_features, b.urbanfm_blocks = 8, 1
  b.fode_features, b.fode_ode_steps = 8, 1
  b.stcf_features, b.stcf_blocks, b.stcf_encoder_features, b.stcf_pretrain_steps = 8, 1, 4, 4
  u = c.urbansta
  u.features, u.num_heads, u.num_layers, u.ff_dim, u.fin_features, u.fin_blocks = 8, 2, 1, 8, 8, 1
  u.steps_sta, u.steps_fin, u.steps_joint, u.batch_size = 4, 4, 4, 8
  u.eval_batch, u.log_every = 8, 0
  d = c.diffuflow
  d.features, d.base_channels, d.channel_mults, d.emb_dim = 8, 8, (1,), 8
  d.steps, d.batch_size, d.sampling_steps, d.n_samples = 4, 8, 2, 2
  d.eval_batch, d.log_every = 8, 0
  return c
