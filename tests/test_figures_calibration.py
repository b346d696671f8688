"""The calibration figures of diffrecon_jax/figures.py (reliability diagram, rank histograms) are
written as real PNGs from `metrics.PooledMetrics`, through `write_safely` as evaluate calls them."""
import numpy as np
import pytest

from diffrecon_jax import figures
from diffrecon_jax import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
  data = path.read_bytes()
  return data[:8] == PNG_MAGIC and len(data) > 5000  # not an empty canvas header


def _scored(width, seed):
  rng = np.random.default_rng(seed)
  truth = rng.normal(size=(400,))
  samples = width * rng.normal(size=(19, 400))
  m = metrics.PooledMetrics()
  m.update(np.median(samples, 0), truth, samples=samples)
  return m


def test_reliability_diagram_and_rank_histograms_are_written(tmp_path):
  good, narrow = _scored(1.0, 0), _scored(0.3, 1)
  curves = [(label, m.reliability()["nominal"], m.reliability()["observed"])
            for label, m in (("random:0.4", good), ("random:0.4 raw", narrow))]
  curves.append(("fixed:0.2 (one level)", [0.5, 0.9], [None, 0.8]))
  rel = figures.write_safely(figures.reliability_diagram, curves,
                             path=tmp_path / "figs" / "rel.png", title="reliability")
  assert rel is not None and _is_png(rel)
  hists = [(f"pattern {k}", m.rank_histogram) for k, m in enumerate((good, narrow, good,
                                                                      narrow, good))]
  hists.append(("interp", None))  # a method without samples is left out
  ranks = figures.write_safely(figures.rank_histograms, hists,
                               path=tmp_path / "figs" / "ranks.png", title="ranks")
  assert ranks is not None and _is_png(ranks)


def test_rank_histograms_without_any_samples_refuse():
  with pytest.raises(ValueError, match="no rank histogram"):
    figures.rank_histograms([("interp", None)], path="unused.png", title="t")
