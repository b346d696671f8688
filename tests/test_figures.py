"""Tests of diffrecon_jax/figures.py: every figure is written as a real PNG, and a failing figure
logs a warning instead of raising."""
import numpy as np

from diffrecon_jax import figures
from diffrecon_jax.data import nyc_dsan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
  data = path.read_bytes()
  return data[:8] == PNG_MAGIC and len(data) > 5000  # not an empty canvas header


def test_evaluation_figures_are_written_as_png(tmp_path):
  truth = nyc_dsan.load_nytaxi().values[3000]  # (16, 12, 2) real flows
  rng = np.random.default_rng(0)
  fine = truth * rng.uniform(0.8, 1.2, truth.shape)
  samples = fine[None] * rng.uniform(0.7, 1.3, (2,) + truth.shape)
  observed = (rng.random((8, 6)) > 0.4).astype(np.float32)
  paths = figures.evaluation_figures(tmp_path / "figures", "diffrecon", "random:0.4", truth,
                                     fine, samples, observed, "2016-03-10T08:00",
                                     channel="inflow", units="trips per 30 min",
                                     channels=("inflow", "outflow"))
  assert [p.name for p in paths] == ["diffrecon_random_0.4_3d.png",
                                     "diffrecon_random_0.4_maps.png",
                                     "diffrecon_random_0.4_fields_inflow.png",
                                     "diffrecon_random_0.4_fields_outflow.png"]
  assert all(_is_png(p) for p in paths)
  # a method without samples still gets its maps (no interval panel)
  no_samples = figures.evaluation_figures(tmp_path / "f2", "interp", "fixed:0.2", truth, fine,
                                          None, observed, "2016-03-10T08:00")
  assert len(no_samples) == 4 and all(_is_png(p) for p in no_samples)  # 2 + a field each
  bars = figures.coverage_bars(["fixed:0.2", "random:0.4", "large_scale:0.25"], [0.25, 0.3, None],
                               path=tmp_path / "cov.png", title="coverage")
  assert _is_png(bars)


def test_a_failing_figure_logs_a_warning_and_returns_none(tmp_path, caplog):
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("a file where the figures folder should be")
  with caplog.at_level("WARNING"):
    out = figures.write_safely(figures.coverage_bars, ["a"], [0.5],
                               path=blocker / "cov.png", title="t")
  assert out is None
  assert any("cov.png not written" in r.getMessage() for r in caplog.records)


class _JitteredClimatology:
  """The climatology baseline with two samples around its point (a method with an interval)."""
  name = "jittered"
  sampler = {"n_samples": 2}

  def __init__(self):
    from diffrecon_jax.baselines import climatology
    self.base = climatology.ClimatologyBaseline()

  def reconstruct(self, view, slices):
    rec = self.base.reconstruct(view, slices)
    return dict(rec, samples=np.stack([0.9 * rec["fine"], 1.1 * rec["fine"]]))


def _evaluate(figures_dir):
  from diffrecon_jax import evaluate
  from tests import _train_helpers as helpers
  return evaluate.evaluate_method(helpers.tiny_task(), _JitteredClimatology(),
                                  ("random:0.4", "large_scale:0.25"), seed=0, max_slices=4,
                                  figures_dir=figures_dir)


def test_evaluation_writes_figures_per_pattern_and_the_coverage(tmp_path):
  results = _evaluate(tmp_path / "figures")
  names = sorted(p.name for p in (tmp_path / "figures").iterdir())
  assert names == ["jittered_coverage_90.png", "jittered_large_scale_0.25_3d.png",
                   "jittered_large_scale_0.25_fields_inflow.png",
                   "jittered_large_scale_0.25_fields_outflow.png",
                   "jittered_large_scale_0.25_maps.png", "jittered_random_0.4_3d.png",
                   "jittered_random_0.4_fields_inflow.png",
                   "jittered_random_0.4_fields_outflow.png",
                   "jittered_random_0.4_maps.png", "jittered_rank_histograms.png",
                   "jittered_reliability.png"]
  assert all(_is_png(tmp_path / "figures" / n) for n in names)
  assert all(r["coverage_90"] is not None for r in results)


def test_a_broken_figure_does_not_stop_the_evaluation(tmp_path, monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise RuntimeError("no display, no fonts")
  monkeypatch.setattr(figures, "surfaces_3d", broken)
  with caplog.at_level("WARNING"):
    results = _evaluate(tmp_path / "figures")
  assert [r["mae"] for r in results] == [r["mae"] for r in _evaluate(None)]
  warned = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
  assert len(warned) == 2 and all("no display, no fonts" in w for w in warned), warned
  assert (tmp_path / "figures" / "jittered_random_0.4_maps.png").exists()


def test_fields_on_the_grid_axes(tmp_path):
  """`fields_2d` draws truth, reconstruction, error and interval width on lat / lon when the
  data have them (cell edges halfway between centres, rows north to south)."""
  axes = (("lat", np.array([50.0, 47.5, 45.0]), "degrees_north"),
          ("lon", np.array([0.0, 2.5]), "degrees_east"))
  extent, xlabel, ylabel = figures._axis_extent(axes, (3, 2))
  assert extent == (-1.25, 3.75, 43.75, 51.25)
  assert (xlabel, ylabel) == ("lon (degrees_east)", "lat (degrees_north)")
  assert figures._axis_extent((), (3, 2)) == (None, "column (x)", "row (y)")
  rs = np.random.RandomState(0)
  path = figures.fields_2d(rs.rand(3, 2), rs.rand(3, 2), rs.rand(3, 2), rs.rand(3, 2) + 1,
                           path=tmp_path / "f.png", title="t", units="K", axes=axes)
  assert path.stat().st_size > 10_000
