"""DiffRecon, the model of the paper (Sec. III-IV): everything that defines, trains and samples it.

  model.py          Diffusion-C / Diffusion-F as one `Models` record: conditions, losses
                    (Eq. 7-12), the samplers of both stages and the joint loss (Sec. IV-D);
  denoisers.py      their networks: U-Net + ST-PointFormer (Sec. IV-B), U-Net + T-PatternNet
                    (Sec. IV-C), built on st_pointformer.py, t_patternnet.py, grid_stack.py
                    and the shared models/unet.py;
  settings.py       the typed settings every module reads, built once from the config
                    (configs/default.py holds every default), and `migrate` for saved configs;
  prior.py          the climatology prior the residuals are taken over (ours);
  train.py          the compiled train step and the three-phase loop with its checkpoints;
  method.py         the trained model as an evaluated method (`DiffReconMethod`);
  prior_method.py   the prior alone as a method (the networks' contribution is the difference);
  calibration.py    the ensemble's spread recalibrated on the validation split;
  ablations.py      the paper's ablations (Sec. V-C) as config changes.

Nothing here imports a baseline, and no baseline imports this package: what both use (the
calendar statistics, the U-Net, the diffusion process) lives in data/ and models/.
"""
