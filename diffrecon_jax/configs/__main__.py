"""Prints the folder of the config files: `--config="$(python -m diffrecon_jax.configs)/nytaxi.py"`
finds them in an installed package, where there is no configs/ under the working directory."""
import os

if __name__ == "__main__":
  print(os.path.dirname(os.path.abspath(__file__)))
