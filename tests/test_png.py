"""The PNG of a run's trends: drawn from real runs, decoded back, overlaid, fast on long runs, and
without touching the caller's matplotlib (backend, figures, rcParams)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import TinyTransformer, train_steps
from optiscope import OptimizerMonitor, load_run
from optiscope.dashboards import png
from optiscope.dashboards.png import write_png
from optiscope.dashboards.runs import labelled_histories
from benchmarks.synthetic import synthetic_run
from optiscope.monitor.history import RunHistory
from optiscope.optimizers import AdamW

STEPS, NAN_AT = 24, 20
RUN_COLORS = {"#1f77b4": (0x1F, 0x77, 0xB4), "#d62728": (0xD6, 0x27, 0x28)}  # runs 1 and 2


def train(log_dir: Path, make_opt, *, nan_at: int | None = None) -> Path:
    """A real run of TinyTransformer into ``log_dir``; returns it."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = make_opt(model.parameters())
    with OptimizerMonitor(opt, model=model, log_dir=log_dir, freeze_probe=4, console=False,
                          tensorboard=False, report=False, strict=True) as mon:
        train_steps(mon, model, opt, STEPS, nan_at=nan_at)
    return log_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("png")
    adamw = train(root / "adamw", lambda ps: AdamW(ps, lr=1e-2, backend="torch"), nan_at=NAN_AT)
    sgd = train(root / "sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    return adamw, sgd


def pixels(path: Path) -> np.ndarray:
    """The decoded image as ``[height, width, 3]`` uint8."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def has_color(image: np.ndarray, rgb: tuple[int, int, int], at_least: int = 200) -> bool:
    return int((image == np.array(rgb, dtype=np.uint8)).all(axis=-1).sum()) >= at_least


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


# ---------------------------------------------------------------------------------- one run
def test_a_run_becomes_a_decodable_nonblank_png(runs, tmp_path):
    adamw, _ = runs
    out = write_png([adamw], tmp_path / "trends.png")
    assert out == tmp_path / "trends.png"
    image = pixels(out)
    height, width, _ = image.shape
    assert 1300 <= width <= 1500 and 600 <= height <= 1400, f"{width}×{height} pixels"
    assert image.std() > 20, "the image is (nearly) one colour"
    inked = (image < 240).any(axis=-1).mean()
    assert 0.02 < inked < 0.6, f"{inked:.1%} of the pixels are not white"
    assert has_color(image, RUN_COLORS["#1f77b4"]), "no line in the run's colour"
    assert has_color(image, (0xB4, 0x23, 0x18), at_least=20), "the NaN values are not marked"


def test_panels_are_the_series_the_run_has(runs):
    adamw, sgd = runs
    fig = png._figure([load_run(adamw)], ["adamw"], 110, 1000)
    assert [t.split(" ")[0] for t in titles(fig)] == [
        "loss", "learning", "gradient", "update", "second-moment", "drift", "top-k",
        "optimizer"]
    # SGD keeps no second moment: no drift panels; its momentum buffer is its state.
    fig = png._figure([load_run(sgd)], ["sgd"], 110, 1000)
    assert not any("drift" in t for t in titles(fig))
    memory = fig.axes[-1]
    assert memory.get_title().startswith("optimizer state")
    assert [t.get_text() for t in memory.get_legend().get_texts()] == ["momentum_buffer"]


def test_nonfinite_values_are_marked_at_their_steps(runs):
    adamw, _ = runs
    history = load_run(adamw)
    steps, norms = history.series("grad_norm")
    fig = png._figure([history], ["adamw"], 110, 1000)
    [ax] = [a for a in fig.axes if a.get_title().startswith("gradient norm")]
    marked = [line.get_xdata() for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(marked) == 1 and marked[0].tolist() == steps[~np.isfinite(norms)].tolist()


# ---------------------------------------------------------------------------------- several
def test_several_runs_are_overlaid_with_a_legend(runs, tmp_path):
    adamw, sgd = runs
    out = write_png([adamw, sgd], tmp_path / "both.png", names=["AdamW 1e-2", "SGD 0.1"])
    image = pixels(out)
    for color, rgb in RUN_COLORS.items():
        assert has_color(image, rgb), f"no line in {color}"
    fig = png._figure([load_run(adamw), load_run(sgd)], ["AdamW 1e-2", "SGD 0.1"], 110,
                      1000)
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()][:2] == ["AdamW 1e-2", "SGD 0.1"]
    [loss] = [a for a in fig.axes if a.get_title() == "loss"]
    assert len(loss.get_lines()) == 3  # two runs, and the NaN markers of the first


def test_default_names_are_the_run_directories_made_unique(runs, tmp_path):
    adamw, _ = runs
    histories, labels = labelled_histories(
        [adamw, adamw, RunHistory(meta={"optimizer_name": "Adam"})], None, "write_png")
    assert labels == ["adamw", "adamw (2)", "Adam"]


# ---------------------------------------------------------------------------------- long runs
def test_a_10000_step_run_draws_in_a_few_seconds_with_bounded_lines(tmp_path):
    history = synthetic_run(10_000, layers=4)
    start = time.perf_counter()
    write_png(history, tmp_path / "long.png")
    elapsed = time.perf_counter() - start
    assert elapsed < 8, f"{elapsed:.1f} s for a 10,000-step run"
    assert pixels(tmp_path / "long.png").std() > 20

    fig = png._figure([history], ["long"], 110, bins=500)
    longest = max(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())
    assert longest <= 2 * 500 + 10, f"a line keeps {longest} points for 500 bins"
    [ax] = [a for a in fig.axes if a.get_title().startswith("gradient norm")]
    spike = max(np.nanmax(line.get_ydata()) for line in ax.get_lines() if line.get_marker() != "x")
    assert spike == np.nanmax(history.series("grad_norm")[1]), "the spike was downsampled away"


def test_a_run_without_samples_still_gives_an_image(tmp_path):
    out = write_png(RunHistory(meta={"optimizer_name": "AdamW"}), tmp_path / "empty.png")
    assert pixels(out).std() > 1


# ---------------------------------------------------------------------------------- matplotlib
def test_the_callers_matplotlib_is_left_as_it_was(runs, tmp_path):
    """In a fresh process: pyplot on a non-Agg backend with a figure open and a custom rcParam;
    after the call the backend, the figures, the current figure and the rcParams are the same,
    and a process that never imported pyplot still has not."""
    adamw, _ = runs
    script = textwrap.dedent(f"""
        import sys
        from optiscope.dashboards.png import write_png
        write_png([{str(adamw)!r}], {str(tmp_path / "a.png")!r})
        assert "matplotlib.pyplot" not in sys.modules, "write_png imported pyplot"

        import matplotlib
        import matplotlib.pyplot as plt
        plt.switch_backend("svg")
        matplotlib.rcParams["lines.linewidth"] = 7.0
        fig = plt.figure()
        before = (matplotlib.get_backend(), plt.get_fignums(), dict(matplotlib.rcParams))
        write_png([{str(adamw)!r}], {str(tmp_path / "b.png")!r})
        after = (matplotlib.get_backend(), plt.get_fignums(), dict(matplotlib.rcParams))
        assert before == after, (before[:2], after[:2])
        assert plt.gcf() is fig
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    # The caller's thick lines did not leak into the image: same pixels as without them.
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


# ---------------------------------------------------------------------------------- arguments
def test_bad_arguments_name_the_value_and_the_fix(runs, tmp_path):
    adamw, _ = runs
    with pytest.raises(ValueError, match="no runs given"):
        write_png([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"one name per run \(1\), got \['a', 'b'\]"):
        write_png([adamw], tmp_path / "x.png", names=["a", "b"])
    with pytest.raises(ValueError, match=r"dpi must be a number in \[10, 1000\], got 0"):
        write_png([adamw], tmp_path / "x.png", dpi=0)
    with pytest.raises(ValueError, match="max_points must be an integer >= 4, got 2"):
        write_png([adamw], tmp_path / "x.png", max_points=2)
    with pytest.raises(IsADirectoryError, match="pass a file path such as .*trends.png"):
        write_png([adamw], tmp_path)
    with pytest.raises(TypeError, match=r"runs\[0\] must be a RunHistory or a run directory path"):
        write_png([42], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_png([tmp_path], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
