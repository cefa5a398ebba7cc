"""train.early_stop: AdaMeZO's rule (stop after `patience` dev evaluations in a row without a new best),
for any optimizer; where and why a run stopped lands in metrics.json and log.jsonl, and survives a resume."""

from __future__ import annotations

import json

import pytest

from conftest import fail_once_at
from zobench.early_stopping import EarlyStopping
from zobench.errors import ZobenchError
from zobench.run import run
from zobench.run_record import RunRecord


def _feed(stopper, losses, interval=1):
    """Observe the losses at steps 0, interval, 2·interval, …; the step where it stopped, or None."""
    for i, loss in enumerate(losses):
        if stopper.observe(i * interval, {"loss": loss, "metric": None}):
            return i * interval
    return None


def test_stops_after_patience_evaluations_without_a_new_best():
    # best 0.8 at step 100, then three evaluations no better: the third stops the run
    assert _feed(EarlyStopping(patience=3, interval=100), [1.0, 0.8, 0.9, 0.85, 0.95, 0.1], 100) == 400
    # a new best resets the count
    assert _feed(EarlyStopping(patience=3, interval=100), [1.0, 1.1, 1.2, 0.9, 1.0, 1.1, 1.2], 100) == 600


def test_adamezo_patience_six_needs_six_bad_evaluations():
    losses = [0.7] + [0.8] * 5
    assert _feed(EarlyStopping(patience=6, interval=100), losses, 100) is None
    assert _feed(EarlyStopping(patience=6, interval=100), losses + [0.8], 100) == 600


def test_a_tie_with_the_best_resets_the_count_as_the_authors_strict_comparison():
    assert _feed(EarlyStopping(patience=2), [0.5, 0.6, 0.5, 0.6, 0.5]) is None


def test_metric_mode_wants_a_higher_metric():
    stopper = EarlyStopping(patience=2, metric="metric")
    results = [{"loss": 9.0, "metric": m} for m in (0.5, 0.7, 0.6, 0.65)]
    assert [stopper.observe(s, r) for s, r in enumerate(results)] == [False, False, False, True]
    assert stopper.record()["stopped_early_at"] == 3 and "dev metric than 0.7 (step 1)" in stopper.record()["stop_reason"]


def test_due_on_its_own_interval_with_step_zero_or_on_the_regular_evaluations():
    own = EarlyStopping(patience=6, interval=100)
    assert [s for s in range(0, 401, 50) if own.due(s, regular=False)] == [0, 100, 200, 300, 400]
    regular = EarlyStopping(patience=6, interval=None)
    assert not regular.due(0, regular=False) and not regular.due(5, regular=False) and regular.due(8, regular=True)
    assert not EarlyStopping().due(100, regular=True)  # patience null: never


def test_state_is_plain_numbers_and_round_trips():
    stopper = EarlyStopping(patience=3, interval=10)
    _feed(stopper, [1.0, 0.5, 0.7], 10)
    state = stopper.state_dict()
    assert all(v is None or type(v) in (int, float) for v in state.values())
    again = EarlyStopping(patience=3, interval=10)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.state_dict() == state and again.observe(30, {"loss": 0.9}) is False
    assert again.observe(40, {"loss": 0.9}) is True


@pytest.mark.parametrize("spec, message", [
    ({"patience": 0}, "patience must be an integer >= 1 or null"),
    ({"patience": 2, "interval": 0}, "interval must be an integer >= 1 or null"),
    ({"patience": 2, "metric": "accuracy"}, "metric must be loss or metric"),
])
def test_bad_config_gets_one_line(spec, message):
    with pytest.raises(ZobenchError, match=message):
        EarlyStopping.from_config(spec, has_dev=True)
    with pytest.raises(ZobenchError, match="needs dev examples"):
        EarlyStopping.from_config({"patience": 2}, has_dev=False)


# -- end to end: a tiny run whose dev losses are crafted per step --------------------------------------------------
def _craft_dev_losses(monkeypatch, losses_by_step):
    original = RunRecord.log_eval

    def log_eval(self, split, step, evaluate, examples):
        result = original(self, split, step, evaluate, examples)
        if split == "dev":
            result["loss"] = losses_by_step[step]
        return result

    monkeypatch.setattr(RunRecord, "log_eval", log_eval)


OWN_INTERVAL = ["optimizer=mezo", "train.steps=20", "train.eval_interval=0", "train.early_stop.patience=3",
                "train.early_stop.interval=2", "checkpoint.every=100"]
LOSSES = {0: 1.0, 2: 0.8, 4: 0.9, 6: 0.85, 8: 0.95}  # best at 2; 4, 6, 8 no better: stop at 8


def test_a_run_stops_where_the_patience_says_and_records_it(quick_cfg, tmp_path, monkeypatch):
    _craft_dev_losses(monkeypatch, LOSSES)
    metrics = run(quick_cfg(*OWN_INTERVAL), tmp_path)
    assert metrics["status"] == "completed" and metrics["steps"] == 8 and metrics["steps_planned"] == 20
    assert metrics["stopped_early_at"] == 8 and "3 dev evaluations in a row (every 2 steps)" in metrics["stop_reason"]
    assert metrics["forward_passes"] == 8 * 2  # MeZO: two forward passes per step, 8 steps
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["stopped_early_at"] == 8 and saved["test_metric"] is not None
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l.get("split") == "dev"] == [0, 2, 4, 6, 8]
    assert [l["step"] for l in lines if l["event"] == "early_stop"] == [8]
    assert max(l["step"] for l in lines if l["event"] == "train") == 8
    # the own-interval evaluations choose no kept weights; the stop step is the run's last, so it is a candidate
    assert metrics["best_step"] == 8


def test_counting_the_regular_evaluations_keeps_their_best(quick_cfg, tmp_path, monkeypatch):
    _craft_dev_losses(monkeypatch, {2: 1.0, 4: 1.1, 6: 1.2})
    metrics = run(quick_cfg("optimizer=mezo", "train.steps=20", "train.eval_interval=2",
                            "train.early_stop.patience=2"), tmp_path)
    assert metrics["stopped_early_at"] == 6 and metrics["steps"] == 6
    assert metrics["best_step"] == 2 and metrics["dev_loss"] == 1.0


def test_without_patience_nothing_changes(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=mezo", "train.steps=3", "train.eval_interval=0"), tmp_path)
    assert metrics["steps"] == 3 and metrics["stopped_early_at"] is None and metrics["stop_reason"] is None


def test_the_count_survives_a_resume(quick_cfg, tmp_path, monkeypatch):
    """Killed at step 5 (checkpoint of step 4: best 0.8 at 2, one bad evaluation), the resumed run stops at 8
    as the uninterrupted one does; a fresh count would take 0.85 at 6 as a new best and run on."""
    _craft_dev_losses(monkeypatch, {**LOSSES, 10: 0.95, 12: 0.95, 14: 0.95, 16: 0.95, 18: 0.95, 20: 0.95})
    cfg = quick_cfg(*OWN_INTERVAL[:-1], "checkpoint.every=1")
    fail_once_at(monkeypatch, steps_done=4)
    with pytest.raises(ZobenchError, match="out of memory at step 4"):
        run(cfg, tmp_path)
    resumed = run(cfg, tmp_path)
    assert resumed["resumed_at_step"] == 4 and resumed["stopped_early_at"] == 8 and resumed["steps"] == 8


@pytest.mark.parametrize("preset", ["adamezo_opt1.3b", "adamezo_opt13b"])
def test_adamezo_presets_follow_the_authors_protocol(preset):
    """mezo.sh / trainer.py / run.py of shawnnn3di/AdaMeZO: dev loss every 100 steps, patience 6, the weights
    of the stop tested, eval every 4000 steps, and SEED seeding the data sample and the optimizer alike."""
    from zobench.configs import compose

    cfg = compose([f"experiment={preset}", "seed=3"])
    assert dict(cfg.train.early_stop) == {"patience": 6, "interval": 100, "metric": "loss"}
    assert cfg.train.keep_best == "none" and cfg.train.eval_interval == 4000 and cfg.train.steps == 40000
    assert cfg.data.seed == 3 and cfg.seed == 3
