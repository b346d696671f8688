"""Run configurations: `--config=configs/<name>.py[:variant]` (ml_collections config files).

The files live in the package (diffrecon_jax/configs), so an installed package has them without a
top-level `configs` module in site-packages; the repository's configs/ is a link to this folder,
so the README's `--config=configs/nytaxi.py` works from a checkout. The dataset configs import
`diffrecon_jax.configs.default`: ml_collections loads a config file by its path, outside any
package, and that name resolves to whichever diffrecon_jax is imported.

`python -m diffrecon_jax.configs` prints the folder, for `--config=<folder>/nytaxi.py` outside a
checkout.
"""
