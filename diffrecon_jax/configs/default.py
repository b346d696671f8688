"""Base configuration shared by every dataset config, and the embedded default run.

`get_config(arg)` returns the `nytaxi` CPU run: the README's main command. Every field has a comment
saying where its value comes from: the paper (section), a peer code base (CSDI, PriSTI, TimesNet,
UrbanFM), the evaluation contract (docs/evaluation.md) or our own measurement on the 2-core CPU
machine.
Dataset configs call `base_config()` and override what differs.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.config_version = 4  # the config format (diffrecon/settings.py: CONFIG_VERSION); a saved
                        # config of an earlier version is upgraded by settings.migrate.
  c.seed = 0  # ours: every random choice (init, masks, batches, sampling) derives from it.
  c.method = "diffrecon"  # "diffrecon" or a baseline: "interp", "climatology" (deterministic) or
                          # "srcnn" / "srresnet" / "urbanfm" / "fode" / "stcf" (trained when
                          # evaluated; c.baselines)
                          # or "urbansta" / "diffuflow" (trained when evaluated; c.urbansta,
                          # c.diffuflow).
  c.ablation = ""  # paper Sec. V-C: "" = DiffRecon, or one of its ablations (ablations.py):
                   # "noPre", "noJoint", "noSTPointFormer", "noTPatternNet", "noFG".
  c.ablation_fine_network = "srcnn"  # noFG: the network replacing Diffusion-F on Diffusion-C's
                   # output (paper Fig. 9: srcnn, urbanfm, fode, stcf); chosen at evaluate time.
  c.ablation_fine_on_base = True  # ours: noFG's network corrects the base Diffusion-F corrects
                   # (the prior's split of the completed map; nofg.py), so the ablation takes
                   # away the fine diffusion model alone; False = the paper's network on its
                   # own. Chosen at evaluate time (the network trains then).

  # ---- data (paper Sec. V-A; docs/evaluation.md) ----
  c.data = ml_collections.ConfigDict()
  c.data.name = "nytaxi"          # registry name (diffrecon_jax/data/registry.py); a field named
                                  # like one of its loader's parameters is passed to it.
  c.data.path = ""                # file/folder for datasets that are not embedded; "" = embedded.
  c.data.variable = ""            # variable name inside NetCDF/Zarr/npz files (custom, tapbj);
                                  # "" = the loader's default.
  c.data.scale_factor = 2         # N, magnification (paper Table I uses 4: 8x8 -> 32x32).
  c.data.crop = ""                # "" = grid must be divisible by N (error otherwise); "fit" =
                                  # crop the bottom/right rows/cols that N does not divide.
  c.data.history = 6              # t - 1 history slices before the current one. Paper: not
                                  # given; ours: 6 (3 h of 30-min data) keeps CPU attention cheap.
  c.data.tfds_dir = ""            # "" = read the source files; a folder = keep a TFDS
                                  # array_record copy there (prepared on first use, read after;
                                  # data/tfds_builders.py).
  c.data.gap_rule = "skip"        # holes in the time axis (data/time_axis.py): "skip" = train on
                                  # and score only slices whose windows are whole, "fill" = insert
                                  # the missing slots as fully unobserved slices. Ours: "skip"
                                  # scores only what was observed at the nominal interval.

  # ---- sparse patterns (paper Sec. V-A.2; docs/evaluation.md) ----
  c.patterns = ml_collections.ConfigDict()
  # Evaluated: the nine of the contract.
  c.patterns.eval = ("fixed:0.2", "fixed:0.4", "fixed:0.6", "fixed:0.8", "random:0.2",
                     "random:0.4", "random:0.6", "random:0.8", "large_scale:0.25")
  # Drawn on the fly in training (ours): one model trained on a mix of every pattern and ratio.
  c.patterns.train = c.patterns.get_ref("eval")
  c.patterns.eval_mask_seed = 0   # docs/evaluation.md: masks drawn from a recorded seed.

  # ---- diffusion (paper Sec. IV-B; values from CSDI since the paper gives none) ----
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_steps = 50        # T. CSDI: 50.
  c.diffusion.schedule = "quad"     # CSDI: quad.
  c.diffusion.beta_start = 1e-4     # CSDI: 1e-4.
  c.diffusion.beta_end = 0.5        # CSDI: 0.5 (PriSTI: 0.2).
  c.diffusion.fine_residual = True  # ours (measured): Diffusion-F diffuses fine minus the
                                    # coarse map's uniform upsampling; the plain fine target
                                    # sampled with a biased mean (phys. MAE 53 vs interp 19).
  c.diffusion.fine_base = "climatology"  # what Diffusion-F's residual is taken over: "uniform"
                                    # (each coarse value spread evenly) or "climatology" (split
                                    # by the train split's per-slot shares; prior.py). Ours.
  c.diffusion.coarse_residual = True  # ours: Diffusion-C diffuses the residual over the
                                    # climatological first guess (prior.coarse_guess).
  c.diffusion.guess_local_level = True  # ours (measured on nytaxi val; WORKSPACE.md): a hidden
                                    # cell's first guess at the level of its own earlier
                                    # observations (prior.local_level), not the map's one level.
  c.diffusion.guess_local_sigma = 0.0  # ours (measured; WORKSPACE.md): 0 = the cell's own
                                    # observations, > 0 = a Gaussian over its neighbours.
  c.diffusion.guess_local_shrink = 1.0  # ours (measured; WORKSPACE.md): weight of the map's level.
  c.diffusion.prior_slot_sigma_minutes = 20.0  # ours (measured; WORKSPACE.md): the slot means
                                    # smoothed over neighbouring slots by a Gaussian of this many
                                    # minutes (prior.smooth_over_slots); 0 = the raw means.
  c.diffusion.prior_cross_fit_folds = 0  # ours (measured; WORKSPACE.md, "Cross-fitted prior
                                    # tables"): K > 1 = in training, each training slice's guess
                                    # and base come from the table fitted without its day's fold
                                    # of K interleaved folds (prior.fit_prior); 0 = the one table.
                                    # K = 8 moved the validation MAE by -0.5 to +0.9% on five
                                    # grids, so it stays off.
  c.diffusion.residual_scaling = "cell"  # ours (measured; WORKSPACE.md): divide both residuals
                                    # by their train-split std per "channel" or per "cell" (and
                                    # channel), so they have the schedule's unit scale; "" = none.
  c.diffusion.prediction = "x0"     # what the denoisers output: "eps" (DDPM, the paper) or
                                    # "x0" (ours: gives the one-pass posterior mean, below).

  # ---- sampling (paper Sec. IV-B, eqs. 6-7): chosen at evaluate time, replaced as a whole ----
  c.sampling = ml_collections.ConfigDict()
  c.sampling.sampler = "ddim"       # ours: DDIM on CPU (measured: DDPM chains cost ~20x more).
  c.sampling.steps = 4              # S for DDIM; ours (measured; WORKSPACE.md). DDPM takes T.
  c.sampling.eta = 1.0              # ours: stochastic DDIM so samples spread (CRPS is meaningful).
  c.sampling.n_samples = 4          # ensemble members per map (CRPS, spread, intervals); ours
                                    # (measured; WORKSPACE.md).
  c.sampling.ensemble = "members"   # ours: each member draws its own completion of the hidden
                                    # coarse cells and its fine map from it, so the spread holds
                                    # stage 1's uncertainty; "shared_completion" = one completion
                                    # per slice for every member (measured; WORKSPACE.md).
  c.sampling.consistent = True      # ours: remove each N x N block's residual mean, so the fine
                                    # map pools exactly to the completed coarse map.
  c.sampling.x0_clip_factor = 1.2   # ours: clip each step's s_0 estimate to 1.2x the largest
                                    # |value| of the normalised train split (0 = no clip).
  c.sampling.point = "posterior_mean"  # "median" of the samples, or "posterior_mean": the
                                    # x0-denoiser's one-pass estimate (needs prediction "x0").
  c.sampling.prng_impl = "rbg"      # ours (measured; WORKSPACE.md): XLA's RngBitGenerator;
                                    # "" = JAX's default. Bits differ between backends.

  # ---- Diffusion-C: U-Net + ST-PointFormer (Sec. IV-C) ----
  # CPU sizes: measured so that the default run (train + evaluate all nine patterns on the whole
  # nytaxi test split) fits a 2-core laptop; the `gpu` variant has the peer-sized models.
  c.model_c = ml_collections.ConfigDict()
  c.model_c.base_channels = 16      # ours (CPU); CSDI uses 64 channels.
  c.model_c.channel_mults = (1, 2)  # ours: one downsampling for 8x6 coarse grids.
  c.model_c.num_res_blocks = 1      # ours (CPU).
  c.model_c.emb_dim = 32            # ours; CSDI diffusion embedding 128.
  c.model_c.d_model = 16            # ours (CPU); CSDI: 64.
  c.model_c.num_heads = 2           # ours (CPU); CSDI: 8.
  c.model_c.num_layers = 1          # ours (CPU); CSDI: 4 residual layers.
  c.model_c.ff_dim = 32             # ours; CSDI: 64.
  c.model_c.inter_dim = 16          # ours: stacked ST-points projected to this before fusion.
  c.model_c.use_inter = True        # ablation switch (paper Sec. V-C).
  c.model_c.location_dim = 4        # ours: learned per-cell location embedding (0 = none).
  c.model_c.attention_impl = None   # ST-PointFormer attention: None = by backend (CPU: 'manual'
                                    # up to 768 ST-points, 'blockwise' above; else
                                    # jax.nn.dot_product_attention), 'blockwise' = memory linear
                                    # in ST-points (measured: 13 MB vs 98 MB of working memory
                                    # for forward + backward at L = 2048).

  # ---- Diffusion-F: U-Net + T-PatternNet (Sec. IV-D) ----
  c.model_f = ml_collections.ConfigDict()
  c.model_f.base_channels = 16      # ours (CPU).
  c.model_f.channel_mults = (1, 2)  # ours.
  c.model_f.num_res_blocks = 1      # ours (CPU).
  c.model_f.emb_dim = 32            # ours.
  c.model_f.d_model = 16            # TimesNet: 16-64.
  c.model_f.d_ff = 16               # TimesNet: d_ff = d_model for small sets.
  c.model_f.top_k = 2               # TimesNet: 3; t = 7 has only 3 candidate periods (7, 4, 3).
  c.model_f.num_blocks = 1          # TimesNet: 2; ours (CPU).
  c.model_f.num_kernels = 2         # TimesNet: 6 (kernels 1..11); folded grids here are at most
                                    # 7 wide, so kernels 1 and 3 (CPU cost 35x below 6 kernels).
  c.model_f.encoder_channels = 2    # ours: per-location channels after "stacking" (Sec. IV-D end).
  c.model_f.inter_dim = 16          # ours.
  c.model_f.use_inter = True        # ablation switch.
  c.model_f.location_dim = 4        # ours: learned per-cell location embedding (0 = none).

  # ---- training (Sec. IV-E) ----
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16           # ours (CPU); global batch, sharded over the `data` axis.
  c.train.steps_c = 1000            # pre-training steps of Diffusion-C; ours (measured on nytaxi
                                    # val, WORKSPACE.md "Training budget"): a first result in a
                                    # third of the former default's time; `:full` = 8000 / 8000 /
                                    # 1000, the budget of the committed tables.
  c.train.steps_f = 1000            # pre-training steps of Diffusion-F; as steps_c.
  c.train.steps_joint = 125         # joint steps; as steps_c.
  c.train.lr_c = 1e-3               # CSDI: 1e-3 (Adam).
  c.train.lr_f = 1e-3               # CSDI: 1e-3.
  c.train.lr_joint_c = 2e-4         # ours: smaller rates when fine-tuning jointly.
  c.train.lr_joint_f = 2e-4         # ours.
  c.train.weight_decay = 1e-6       # CSDI: 1e-6.
  c.train.adam_eps = 1e-8           # optax's default: Adam's denominator floor.
  c.train.grad_clip = 1.0           # ours: guards the first steps of the attention layers.
  c.train.joint_weight_c = 1.0      # joint loss = w_c * L_C + w_f * L_F; ours: equal.
  c.train.joint_weight_f = 1.0
  c.train.point_fraction = 0.25     # ours: share of each batch at the last step, where an
                                    # x0-denoiser learns the posterior mean (sampling.point).
  c.train.point_loss = "l1_physical"  # ours: the point-estimate step learns the posterior
                                    # median (MAE-optimal) instead of the mean, its absolute
                                    # error counted in the data's units (Models.point_scale;
                                    # measured, WORKSPACE.md "Where the fine error comes from").
  c.train.loss_c_on_hidden = True   # CSDI / PriSTI: Diffusion-C's loss on the hidden cells only.
  c.train.ema_decay = 0.999         # ours (vdm / DDPM practice: 0.9999 for long runs).
  c.train.ema_warmup = True         # ours (measured; WORKSPACE.md): the EMA decay warms up from
                                    # each phase's first step (train.ema_decay_at; TF's EMA).
  c.train.lr_schedule = "cosine"    # ours (measured; WORKSPACE.md): "cosine" to 0.1x over each
                                    # phase, or "constant" (CSDI).
  c.train.compile_ahead = True      # ours (measured; WORKSPACE.md): stage_f's and joint's steps
                                    # compile on a background thread while stage_c trains.
  c.train.steps_per_call = 1        # measured: XLA:CPU runs the step ~10x slower inside
                                    # lax.scan, so CPU calls one step at a time; `gpu`: 50 (vdm).
  c.train.log_every = 100           # console + metrics.jsonl cadence (in steps).
  c.train.tensorboard = False       # ours: also write TensorBoard events of the same records
                                    # (workdir/tensorboard; needs tensorboardX, the `tb` extra).
  c.train.checkpoint_every = 500    # Orbax save cadence (in steps); work lost on a kill <= this.
  c.train.keep_checkpoints = 2      # Orbax max_to_keep per stage.
  c.train.joint_x0_clip_factor = 1.2  # ours: bound Diffusion-C's one-step estimate in the
                                    # joint loss (it divides by sqrt(abar), ~0.006 at the last
                                    # step) by the sampler's rule: 1.2x the largest |value| of
                                    # the normalised coarse train split (0 = no clip).
  c.train.init_prng_impl = "rbg"    # measured: initialisation compiles 3x faster than threefry.
  # Persistent XLA cache: reruns (evaluate after train, resumed runs) skip recompiling.
  c.train.compilation_cache_dir = "~/.cache/diffrecon_jax/xla"

  # ---- evaluation (docs/evaluation.md) ----
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64            # maps per sampler call (at most; see balanced_batch_size);
                                    # ours (measured; WORKSPACE.md).
  c.eval.split = "test"             # "test" or "val".
  c.eval.max_slices = 0             # 0 = whole split; >0 evaluates the first n slices (smoke runs).
  c.eval.chunk_slices = 0           # 0 = the split in one piece; >0 bounds memory on big grids.
  c.eval.save_predictions = False   # ours: also save per pattern the truth, the point estimate
                                    # and the 90% interval as CF NetCDF (workdir/predictions/),
                                    # for rescoring offline without rerunning.
  c.eval.save_members = False       # ours: with save_predictions, the ensemble members too.
  c.eval.concurrent_batches = 0     # sampler batches run at once; 0 = automatic: 2 on CPU,
                                    # 1 on accelerators (measured; WORKSPACE.md).

  # ---- the calendar table of the climatology reference and of DiffRecon's prior ----
  c.climatology = ml_collections.ConfigDict()
  c.climatology.table = "auto"      # ours (issue: the strongest calendar reference): "auto"
                                    # scores the slot of the day, of the week and their
                                    # shrinkage blends on the validation split and keeps the
                                    # best (calendar_choice.py); "day", "week" or
                                    # "blend:K" fixes it. The prior uses the same table.

  # ---- recalibration of the ensemble (calibration.py), fitted on the VALIDATION split ----
  c.calibration = ml_collections.ConfigDict()
  c.calibration.enabled = True      # ours: fit spread and interval scales on val once per
                                    # sampler (workdir/calibration.json), apply them to every
                                    # evaluation and reconstruction; raw numbers reported beside.
  c.calibration.spread_rule = "spread_skill"  # ours: the members' spread scale makes the
                                    # spread-skill 1 on val (the contract's calibration);
                                    # "crps": the scale of lowest fair CRPS on val (EMOS-style).
  c.calibration.val_slices = 0      # 0 = the whole validation split, under each evaluation
                                    # pattern (ours: fitted on its first week alone, nytaxi's
                                    # spread-skill read 1.24 on the next week: one week's
                                    # errors are not the split's); > 0 = its first n slices;
                                    # eval.max_slices > 0 (smoke runs) caps it.
  c.calibration.val_stride = 3      # ours (measured; WORKSPACE.md): fit on every third day-long
                                    # block of those slices (calibration.validation_slices), a
                                    # third of the work spread over the split; 1 = all of them.

  # ---- reconstruct your own observations (--mode=reconstruct; user_reconstruct.py) ----
  # Read from the command line at reconstruct time; the model comes from the workdir.
  c.reconstruct = ml_collections.ConfigDict()
  c.reconstruct.input = ""          # file of coarse maps (T, I, J[, C]) to reconstruct, NaN = not
                                    # observed (.nc / Zarr / .npz / .npy); "" = re-run the
                                    # dataset's own split under the evaluation masks.
  c.reconstruct.variable = ""       # array / variable inside the file; "" = the only candidate.
  c.reconstruct.layout = "THWC"     # axis order of the stored array ("THW" for one channel).
  c.reconstruct.timestamps_key = "" # array holding the timestamps; "" = the CF time coordinate
                                    # (NetCDF / Zarr) or an array named `time` (npz).
  c.reconstruct.external_key = ""   # (T, F) external features in the file; "" = calendar
                                    # features of the timestamps (what a user grid trains with).
  c.reconstruct.output = ""         # path without suffix for the .nc and .npz written; "" =
                                    # workdir/reconstruction/<input name>.
  c.reconstruct.save_samples = False  # also write the fine samples (S per map; sampling.n_samples).

  # ---- deterministic super-resolution baselines (baselines/supervised.py) ----
  # --config.method=srcnn|srresnet|urbanfm --mode=evaluate trains on the train split, then scores.
  c.baselines = ml_collections.ConfigDict()
  c.baselines.steps = 10000         # ours (CPU budget; WORKSPACE.md); the papers train 10^5+.
  c.baselines.batch_size = 32       # ours; UrbanFM: 16, SRResNet: 16.
  c.baselines.lr = 1e-3             # ours: Adam; SRResNet and UrbanFM use 1e-4 over far longer
                                    # runs, a short CPU budget needs the larger rate.
  c.baselines.loss = "l2"           # SRCNN, SRResNet (its MSE variant) and UrbanFM: MSE.
  c.baselines.train_masked = True   # ours: also train on interp completions of the train split
                                    # under patterns.train, so inputs look like the scored ones.
  c.baselines.interp_time_weight = 0.1  # the interp baseline's (measured; see WORKSPACE.md).
  c.baselines.log_every = 1000      # training log cadence (in steps): ten lines per run.
  c.baselines.srcnn_features = (64, 32)  # SRCNN: n1 = 64, n2 = 32.
  c.baselines.srcnn_kernels = (9, 1, 5)  # SRCNN: the 9-1-5 network.
  c.baselines.srresnet_features = 32     # ours (CPU); SRResNet: 64.
  c.baselines.srresnet_blocks = 4        # ours (CPU); SRResNet: 16 residual blocks.
  c.baselines.urbanfm_features = 32      # ours (CPU); UrbanFM: 128.
  c.baselines.urbanfm_blocks = 4         # ours (CPU); UrbanFM: 16 residual blocks.

  # ---- FODE and STCF: their fields live in c.baselines (baselines/fode.py, baselines/stcf.py);
  # both keep UrbanFM's frame and train in the loop above with its steps, batch, rate and loss ----
  c.baselines.fode_features = 32         # ours (CPU), as urbanfm_features (FODE: 128 as UrbanFM).
  c.baselines.fode_ode_steps = 2         # ours: RK4 steps on tau in [0, 1] (8 field evaluations,
                                         # about the compute of UrbanFM's 4 blocks); FODE: an
                                         # adaptive solver.
  c.baselines.stcf_features = 32         # ours (CPU), as urbanfm_features (STCF: 128 as UrbanFM).
  c.baselines.stcf_blocks = 4            # ours (CPU), as urbanfm_blocks.
  c.baselines.stcf_encoder_features = 16  # ours (CPU): width of each pre-trained encoder.
  c.baselines.stcf_pretrain_steps = 1000  # ours: contrastive steps per encoder (spatial, then
                                          # temporal); a tenth of the supervised budget.
  c.baselines.stcf_temperature = 0.1     # ours: InfoNCE temperature, SimCLR's usual range.

  # ---- UrbanSTA (baselines/urbansta.py): trained when evaluated, like the baselines above ----
  c.urbansta = ml_collections.ConfigDict()
  c.urbansta.features = 16          # ours (CPU budget): STA token width.
  c.urbansta.num_heads = 2          # ours (CPU budget); must divide features.
  c.urbansta.num_layers = 1         # ours (CPU budget): temporal + spatial attention layers.
  c.urbansta.ff_dim = 32            # ours: STA feed-forward width (2x features).
  c.urbansta.fin_features = 32      # as c.baselines.urbanfm_features (UrbanFM: 128).
  c.urbansta.fin_blocks = 4         # as c.baselines.urbanfm_blocks (UrbanFM: 16).
  # Equal terms with DiffRecon: each stage as many steps of as large batches as its counterpart
  # (STA ~ Diffusion-C, FIN ~ Diffusion-F, joint ~ joint); ~5 min on 2 cores for nytaxi.
  # (-1 = DiffRecon's value, read when the method is built, so every variant keeps them equal.)
  c.urbansta.steps_sta = -1         # stage 1, STA alone: -1 = c.train.steps_c (Diffusion-C).
  c.urbansta.steps_fin = -1         # stage 2, FIN alone: -1 = c.train.steps_f (Diffusion-F).
  c.urbansta.steps_joint = -1       # stage 3, joint: -1 = c.train.steps_joint.
  c.urbansta.batch_size = -1        # -1 = c.train.batch_size.
  c.urbansta.lr = 1e-3              # ours: Adam, as c.baselines.lr.
  c.urbansta.lr_joint = 2e-4        # ours: smaller rate when fine-tuning jointly.
  c.urbansta.loss_on_hidden = True  # ours: STA's loss on the hidden cells only.
  c.urbansta.completion_weight = 1.0  # ours: joint loss = fine loss + this x completion loss.
  c.urbansta.eval_batch = 256       # ours: windows per network call at evaluation.
  c.urbansta.log_every = 100        # training log cadence (in steps).

  # ---- DiffUFlow (baselines/diffuflow.py): trained when evaluated, like the baselines above ----
  c.diffuflow = ml_collections.ConfigDict()
  c.diffuflow.features = 16         # ours (CPU): width of the spatio-temporal features.
  c.diffuflow.base_channels = 16    # ours (CPU), as model_f: U-Net width of the denoiser.
  c.diffuflow.channel_mults = (1, 2)  # ours, as model_f: one downsampling of 16x12 grids.
  c.diffuflow.num_res_blocks = 1    # ours (CPU), as model_f.
  c.diffuflow.emb_dim = 32          # ours, as model_f: step + external embedding width.
  c.diffuflow.history = -1          # past coarse maps in the condition; -1 = data.history.
  c.diffuflow.num_train_steps = 50  # T; as c.diffusion (CSDI), DiffUFlow's own T not used.
  c.diffuflow.schedule = "quad"     # as c.diffusion (CSDI).
  c.diffuflow.beta_start = 1e-4     # as c.diffusion (CSDI).
  c.diffuflow.beta_end = 0.5        # as c.diffusion (CSDI).
  c.diffuflow.steps = -1            # equal terms: -1 = c.train.steps_f (Diffusion-F's
                                    # pre-training; its batch is twice Diffusion-F's; ~5 min).
  c.diffuflow.batch_size = 32       # ours, as c.baselines.
  c.diffuflow.lr = 1e-3             # ours: Adam, as c.baselines and CSDI.
  c.diffuflow.sampling_steps = 10  # DDIM steps; ours (CPU budget).
  c.diffuflow.eta = 1.0             # ours, as c.sampling: stochastic DDIM so samples spread.
  c.diffuflow.n_samples = 8         # samples per map (point and CRPS); ours (CPU budget).
  c.diffuflow.point = "median"      # point estimate from the samples: the median of 8 is far
                                    # less noisy than their mean of 4 ("mean" = before).
  c.diffuflow.use_mask = True       # the missing-data path: the window's observation masks in
                                    # the condition (the paper lists DiffUFlow among the methods
                                    # that handle missing data); False = interp completions only.
  c.diffuflow.residual = True       # ours: diffuse fine minus the completed coarse map's uniform
                                    # upsampling (per-channel std 1), as c.diffusion.fine_residual.
  c.diffuflow.n2_normalize = True   # ours: every sample's N x N blocks rescaled to the completed
                                    # coarse cell (UrbanFM's N^2-Normalization); False = raw.
  c.diffuflow.x0_clip_factor = 1.2  # ours, as c.sampling.x0_clip_factor (0 = no clip).
  c.diffuflow.train_masked = True   # ours, as c.baselines: also train on interp completions.
  c.diffuflow.interp_time_weight = 0.1  # the interp baseline's (measured; see WORKSPACE.md).
  c.diffuflow.eval_batch = 64       # ours: maps per sampler call, as c.eval.batch_size.
  c.diffuflow.log_every = 500       # training log cadence (in steps).
  return c


def make_full_size(c: ml_collections.ConfigDict) -> None:
  """Peer-sized model and sampler for an accelerator (the `:gpu` variants)."""
  c.data.history = 12               # ours: 12 slices (6 h at 30 min; TimesNet periods 12,6,4,3,2).
  c.sampling.sampler = "ddpm"       # paper eqs. 6-7: ancestral sampling over all T steps.
  c.sampling.n_samples = 8          # ours; CSDI evaluates with 100 samples, 8 keeps runs short.
  for m in (c.model_c, c.model_f):
    m.base_channels = 64            # CSDI: 64 channels.
    m.channel_mults = (1, 2)        # ours: 8x8 coarse / 32x32 fine keep one downsampling.
    m.num_res_blocks = 2            # ours.
    m.emb_dim = 128                 # CSDI: diffusion embedding 128.
    m.inter_dim = 64                # ours.
  c.model_c.d_model = 64            # CSDI: 64.
  c.model_c.num_heads = 8           # CSDI: 8.
  c.model_c.num_layers = 2          # ours (CSDI: 4 residual layers of 2 transformers each).
  c.model_c.ff_dim = 128            # ours.
  c.model_f.d_model = 64            # TimesNet: up to 64.
  c.model_f.d_ff = 64               # TimesNet: d_ff = d_model.
  c.model_f.top_k = 3               # TimesNet: 3.
  c.model_f.num_blocks = 2          # TimesNet: 2.
  c.model_f.num_kernels = 6         # TimesNet: 6.
  c.model_f.encoder_channels = 4    # ours.
  c.train.batch_size = 32           # ours.
  c.train.steps_c = 20000           # ours: about 200 CSDI epochs of nytaxi-sized data.
  c.train.steps_f = 20000
  c.train.steps_joint = 5000
  c.train.checkpoint_every = 2000
  c.train.log_every = 500
  c.train.ema_decay = 0.9995        # ours.
  c.train.steps_per_call = 50       # vdm: fuse steps with lax.scan on accelerators.


def use_paper_architecture(c: ml_collections.ConfigDict) -> None:
  """The model as published (the `:paper` variants): none of our additions to the networks'
  inputs, targets and point estimate (climatology prior and its residual scaling, location
  embeddings, hidden-cell loss, x0 prediction, the one-pass point estimate and its L1 step):
  eps prediction, the paper's ancestral sampler over all T steps (eqs. 6-7) and the median of
  the samples. The stage-2 residual over the uniform spread and consistent fine maps stay:
  without them Diffusion-F samples with a biased mean (measured MAE 53 vs interp 19). The
  sampler matters: the CPU default's 4-step DDIM gave this eps-predictor a fine MAE of 45.4 on
  nytaxi random:0.2 (64 test slices, a check of the published sampler, not a tuning), DDPM over
  its 50 steps 3.58."""
  c.diffusion.fine_base = "uniform"
  c.diffusion.coarse_residual = False
  c.model_c.location_dim = 0
  c.model_f.location_dim = 0
  c.train.loss_c_on_hidden = False
  c.train.point_fraction = 0.0
  c.train.point_loss = "l2"
  c.diffusion.prediction = "eps"
  c.sampling.sampler = "ddpm"       # paper eqs. 6-7 (DDIM's few steps suit x0 prediction only).
  c.sampling.point = "median"


def use_table_budget(c: ml_collections.ConfigDict) -> None:
  """The `:full` variant: the CPU training budget the committed result tables ran with
  (docs/results; README), 8,000 + 8,000 + 1,000 steps at constant rates with the plain EMA, the
  point step's absolute error on the scaled residuals and the calibration fitted on every
  validation slice, about 13 minutes on 2 cores against the
  default's 4: a longer run for tables, the default for a first result (measured; WORKSPACE.md,
  "Training budget")."""
  c.train.steps_c = 8000
  c.train.steps_f = 8000
  c.train.steps_joint = 1000
  c.train.lr_schedule = "constant"
  c.train.ema_warmup = False
  c.train.point_loss = "l1"         # the tables' runs: |error| of the scaled residuals
  c.calibration.val_stride = 1


# The `:tpu` variant's batch per chip and the slice it assumes unless `chips=N` names another.
TPU_BATCH_PER_CHIP = 32  # ours: the `:gpu` variant's batch on one accelerator (not tuned on TPU).
TPU_CHIPS = 8            # a v5litepod-8 / v6e-8: the 8-chip one-host slices (a v4-8 has 4 chips,
                         # a v5litepod-16 8 chips on 2 hosts: pass chips=N for any other slice).


def make_tpu(c: ml_collections.ConfigDict, chips: int = TPU_CHIPS) -> None:
  """The `:tpu` variants: the peer-sized model and sampler of `:gpu` (`make_full_size`) on a Cloud
  TPU slice of `chips` chips, the global batch set from the batch per chip.

  The config is read before JAX joins the slice's hosts (jax.distributed must start first), so the
  chip count comes from the variant string (`tpu,chips=32`) rather than from jax.device_count().
  Precision stays float32 in the config: no field sets the networks' dtype, and on TPU XLA's
  default matmul precision already feeds float32 matmuls to the MXU as bfloat16 passes.
  """
  make_full_size(c)
  c.train.batch_size = TPU_BATCH_PER_CHIP * chips  # global batch, split over the `data` axis of
                                    # every chip of the slice (parallel.check_batch_size).
  c.train.checkpoint_every = 1000   # ours: half of `:gpu`'s 2000, since spot / preemptible slices
                                    # are stopped at any time; a multiple of `:gpu`'s 50 fused
                                    # steps per call, so every call stays full length.


VARIANTS = ("cpu", "full", "gpu", "tpu", "paper", "chips=N")


def apply_variant(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Comma-separated variants: `cpu` (default; the base config as is), `full`
  (`use_table_budget`: the budget of the committed tables), `gpu`
  (`make_full_size`), `tpu` (`make_tpu`; `chips=N` for a slice of N chips, default TPU_CHIPS),
  `paper` (`use_paper_architecture`), e.g. `gpu,paper` or `tpu,chips=32`."""
  parts = [a.strip() for a in (arg or "").split(",") if a.strip()]
  chips = [p for p in parts if p.startswith("chips=")]
  if chips and "tpu" not in parts:
    raise ValueError(f"config variant {chips[0]!r} only goes with `tpu`, e.g. tpu,{chips[0]}")
  for part in parts:
    if part == "gpu":
      make_full_size(c)
    elif part == "tpu":
      make_tpu(c, _chips(chips[-1]) if chips else TPU_CHIPS)
    elif part == "paper":
      use_paper_architecture(c)
    elif part == "full":
      use_table_budget(c)
    elif part != "cpu" and part not in chips:
      raise ValueError(f"unknown config variant {part!r}; use a comma-separated list of "
                       f"{VARIANTS}")
  return c


def _chips(part: str) -> int:
  value = part.split("=", 1)[1]
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"config variant {part!r}: chips=N needs a whole number N >= 1")
  return int(value)


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  """The embedded real-data default: NYC taxi flows 16x12 -> 8x6 (N=2), CPU-sized."""
  return apply_variant(base_config(), arg)
