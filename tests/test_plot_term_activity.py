"""scripts/plot_term_activity.py reads the per-epoch metric lines that MONAI's StatsHandler writes (produced here by
a real StatsHandler on an ignite engine, into a log file) and draws the pass shares and gradient norms."""

from __future__ import annotations

import logging

import pytest
from helpers import REPO, load_module
from ignite.engine import Engine, Events
from monai.handlers import StatsHandler

plot_tool = load_module(REPO / "scripts/plot_term_activity.py")


def write_log(path, per_epoch: list[dict[str, float]]) -> None:
    """A log file with StatsHandler's epoch lines for an engine whose metrics are ``per_epoch[k]`` after epoch k."""
    logger = logging.getLogger(f"plot_term_activity_test_{path.stem}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
    logger.addHandler(handler)
    engine = Engine(lambda e, b: 0.5)

    @engine.on(Events.EPOCH_COMPLETED)
    def set_metrics(e: Engine) -> None:
        e.state.metrics = dict(per_epoch[e.state.epoch - 1])

    StatsHandler(name=logger.name, iteration_log=False, tag_name="train_loss").attach(engine)
    engine.run(range(2), max_epochs=len(per_epoch))
    handler.close()
    logger.removeHandler(handler)


def test_reads_the_bundle_log_and_draws_both_panels(tmp_path):
    epochs = [
        {"train_intra_pass_0": 0.9, "train_intra_pass_1": 0.0, "train_grad_intra": 0.001, "train_supervised": 0.6},
        {"train_intra_pass_0": 0.95, "train_intra_pass_1": 0.4, "train_grad_intra": 0.02, "train_supervised": 0.4},
    ]
    log = tmp_path / "run.log"
    write_log(log, epochs)
    with open(log) as lines:
        read = plot_tool.read_epoch_metrics(lines)
    assert set(read) == {1, 2}
    assert read[2]["train_intra_pass_1"] == pytest.approx(0.4) and read[1]["train_grad_intra"] == pytest.approx(0.001)
    assert plot_tool.series(read, plot_tool.PASS)["train_intra_pass_1"] == [(1, 0.0), (2, pytest.approx(0.4))]
    png = tmp_path / "activity.png"
    plot_tool.main([str(log), "--out", str(png)])
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_log_without_pass_shares_is_refused(tmp_path):
    log = tmp_path / "plain.log"
    write_log(log, [{"train_seg": 0.5}])
    with pytest.raises(ValueError, match="no train_<term>_pass_<c> metrics"):
        plot_tool.main([str(log), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="no such log file"):
        plot_tool.main([str(tmp_path / "missing.log"), "--out", str(tmp_path / "x.png")])
