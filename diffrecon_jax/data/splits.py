"""The chronological 2:1:1 split of a series (paper Sec. V-A; docs/evaluation.md)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Split:
  """Chronological 2:1:1 boundaries: train [0, val_start), val [val_start, test_start),
  test [test_start, T)."""
  num_slices: int
  val_start: int
  test_start: int

  @classmethod
  def chronological(cls, num_slices: int) -> "Split":
    return cls(num_slices, 2 * num_slices // 4, 3 * num_slices // 4)

  def range(self, name: str) -> tuple:
    return {"train": (0, self.val_start), "val": (self.val_start, self.test_start),
            "test": (self.test_start, self.num_slices)}[name]
