"""The one exception type for bad input data (its own module so every data module can raise it
without importing the series type)."""


class DataError(ValueError):
  """Bad input data: the message names the file / array, the shape or value, and what to fix."""
