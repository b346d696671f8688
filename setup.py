"""Installable package for diffrecon_jax.

Lower bounds are the versions the test suite was run with (see WORKSPACE.md). Every package
the code or the tests import is declared here: CI installs into a fresh virtual environment, so
an undeclared one fails there.
TensorFlow is deliberately absent: TFDS builders are read with `tfds.data_source`.
"""
from setuptools import find_packages, setup

setup(
    name="diffrecon_jax",
    version="0.1.0",
    description="DiffRecon in JAX/Flax: fine-grained spatiotemporal maps from sparse coarse observations",
    python_requires=">=3.10",
    packages=find_packages(include=["diffrecon_jax", "diffrecon_jax.*", "configs"]),
    package_data={"diffrecon_jax": ["data/embedded/*/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10.2",
        "scipy>=1.17.1",  # interp baseline (ndimage distance transform); also a jax dependency.
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "numpy>=2.0",
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "absl-py>=2.5.1",
        "etils>=1.15.0",  # epath: checkpoint paths in train.py (also an orbax dependency).
        "h5py>=3.16.0",
        "numcodecs>=0.16.6",
        "netCDF4>=1.7.5",
        "zarr>=3.1.0",  # users' Zarr v3 stores (v2 stores are decoded with numcodecs alone).
        "matplotlib>=3.11.2",  # figures.py: the figures evaluate and reconstruct write.
    ],
    extras_require={
        # nbclient / nbformat / ipykernel: tests/test_notebook.py runs launch/colab.ipynb.
        "test": ["pytest>=9.0", "chex>=0.1.92", "nbclient>=0.11.0", "nbformat>=5.11.1",
                 "ipykernel>=7.4.0", "scoringrules>=0.10.0"],
        "bench": ["torch>=2.13.0", "matplotlib>=3.11.2"],
    },
)
