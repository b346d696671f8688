"""diffrecon_jax: DiffRecon (two-stage conditional diffusion) in JAX/Flax.

Infers complete fine-grained spatiotemporal maps from incomplete coarse-grained observations.
Stage 1 (Diffusion-C) completes the coarse map; stage 2 (Diffusion-F) infers the fine map.
"""
__version__ = "0.1.0"
