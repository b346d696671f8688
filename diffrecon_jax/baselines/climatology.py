"""The `climatology` reference (docs/evaluation.md): the calendar climatology of
data/climatology.py as an evaluated method, with its calendar table chosen by data.

The reference an analyst tries first on periodic urban data. With table "auto" the evaluation
gives it the table `calendar_choice.resolve_table` picks on the validation split (the one
DiffRecon's prior uses) and results.md says which (`calendar_table`).
"""
from __future__ import annotations

from diffrecon_jax import calendar_choice
from diffrecon_jax.data import climatology


class ClimatologyBaseline(climatology.CalendarClimatology):
  """`climatology.CalendarClimatology` under the method interface (`name`, `sampler`,
  `reconstruct(view, slices)`); `calendar_table` records how "auto" was resolved."""

  name = "climatology"
  sampler = None

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.calendar_table = None  # how `table` was chosen (calendar_choice), for results.md


def prepare_reference(method, config, task) -> None:
  """Gives a `ClimatologyBaseline` with table "auto" the table `calendar_choice.resolve_table`
  picks (recorded in its `calendar_table`); any other method is left as it is."""
  if isinstance(method, ClimatologyBaseline) and method.table == "auto":
    method.calendar_table = calendar_choice.resolve_table(config, task)
    method.table = method.calendar_table["table"]
