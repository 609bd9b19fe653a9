"""The console progress line: fed by JSON-lines files, within-epoch rows, ETA."""

import io
import json
import math

from pipeline.progress import EPOCH_SCALE, Progress, describe_epoch_row, epoch_units, fmt_duration


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_epoch_units_count_epoch_records_and_within_epoch_rows(tmp_path):
    units = epoch_units(lambda r: r["arch_id"])
    assert units({"arch_id": "a", "epoch": 2, "test_acc": 0.5}) == ("a", 2 * EPOCH_SCALE)
    assert units({"arch_id": "a", "progress": 1.25, "train_acc": 0.5}) == ("a", int(1.25 * EPOCH_SCALE))


def test_progress_line_sums_trials_in_fractional_epochs(tmp_path):
    out = io.StringIO()
    p = Progress("retrain", EPOCH_SCALE * 2 * 2, tmp_path, epoch_units(lambda r: r["arch_id"]),
                 describe_epoch_row, stream=out, scale=EPOCH_SCALE)  # fmt: skip
    p.poll()  # nothing yet: the baseline for the rate
    _write(tmp_path / "a.jsonl", [{"arch_id": "a", "epoch": 1, "test_acc": float("nan"), "train_acc": 0.7,
                                   "img_per_s": 50.0}])  # fmt: skip
    _write(
        tmp_path / "a.progress.jsonl",
        [{"arch_id": "a", "progress": 0.5, "train_acc": 0.6, "img_per_s": 40.0}],
    )
    _write(
        tmp_path / "b.progress.jsonl",
        [{"arch_id": "b", "progress": 0.5, "train_acc": 0.6, "img_per_s": 40.0}],
    )
    p.poll()
    line = p.line()
    assert line.startswith("[retrain] 1.5/4 (37.5%)"), line  # a: 1 epoch (max of 0.5 and 1), b: 0.5
    assert "ETA ?" not in line  # work was done since the baseline, so there is a rate


def test_describe_epoch_row_never_prints_nan():
    validated = describe_epoch_row({"epoch": 2, "val_acc": 0.8512, "test_acc": math.nan, "train_acc": 0.8})
    assert validated == "epoch 2 val acc 85.12%"
    last = describe_epoch_row({"epoch": 3, "val_acc": 0.8512, "test_acc": 0.8433, "train_acc": 0.8})
    assert last == "epoch 3 val acc 85.12%, test acc 84.33%"
    untested = describe_epoch_row(
        {"epoch": 1, "val_acc": math.nan, "test_acc": math.nan, "train_acc": 0.71, "img_per_s": 55.4}
    )
    assert "nan" not in untested and "train acc 71.0%" in untested and "55 img/s" in untested
    within = describe_epoch_row({"progress": 0.42, "train_acc": 0.5, "img_per_s": 60.0})
    assert within.startswith("0.42 epochs train acc 50.0%")


def test_fmt_duration():
    assert fmt_duration(59) == "0m59s" and fmt_duration(3725) == "1h02m"


def test_run_eta_takes_the_retraining_rate_from_the_first_trial_not_the_run_start(tmp_path):
    """Ten minutes of searching, then one of four one-epoch trials done a minute after the first trial
    started: three trials' worth is left, about three minutes (not the thirty that the rate over the
    whole run would give)."""
    import re
    import time

    from pipeline.progress import Board

    out = tmp_path
    board = Board(out, search_steps=10, epochs_per_trial=1, known_trials=lambda: 4, searches=["t00"],
                  stream=io.StringIO())  # fmt: skip
    board.t0 -= 600  # the run started ten minutes ago
    board.t0_wall -= 600
    board.poll()
    board.line()  # the baseline: nothing restored
    _write(out / "search" / "t00" / "metrics.jsonl", [{"trial_id": "t00", "step": 10, "loss": 1.0}])
    (out / "search" / "t00" / "result.json").write_text(json.dumps({"finished_at": time.time() - 60}))
    (out / "retrain").mkdir()
    (out / "retrain" / "a.started").write_text(json.dumps({"started_at": time.time() - 60}))
    _write(out / "retrain" / "a.jsonl", [{"arch_id": "a", "epoch": 1, "val_acc": 0.5, "test_acc": 0.5}])
    board.poll()
    line = board.line()
    eta = re.search(r"ETA (\d+)m(\d+)s", line)
    assert eta and 150 <= 60 * int(eta[1]) + int(eta[2]) <= 210, line
    assert "retrain 1.0/4 epochs" in line and "(1/1 ended)" in line


def test_run_resumed_after_every_search_ended_says_so_instead_of_counting_steps(tmp_path):
    """A resumed run with no search left plans 0 steps: the line says the searches ended earlier (it
    used to read 'search 1/1 steps')."""
    import time

    from pipeline.progress import Board

    for t in ("t00", "t01"):
        (tmp_path / "search" / t).mkdir(parents=True)
        (tmp_path / "search" / t / "result.json").write_text(json.dumps({"finished_at": time.time() - 60}))
    board = Board(tmp_path, search_steps=0, epochs_per_trial=1, known_trials=lambda: 3, searches=["t00", "t01"],
                  stream=io.StringIO())  # fmt: skip
    board.poll()
    line = board.line()
    assert "search: all 2 ended earlier" in line and "steps" not in line, line


def test_run_eta_while_an_emission_waits_is_the_searchs_time_left_as_a_lower_bound(tmp_path):
    """An emission is queued but no trial has trained yet: the retraining has no rate, yet the line
    still says how long the search has left, as a lower bound ('+'), not 'ETA ?'."""
    import re

    from pipeline.progress import Board

    out = tmp_path
    board = Board(out, search_steps=10, epochs_per_trial=1, known_trials=lambda: 1, searches=["t00"],
                  stream=io.StringIO())  # fmt: skip
    board.poll()
    board.line()  # the baseline: nothing restored
    board.t0 -= 60  # a minute of searching: half of the steps
    row = {
        "trial_id": "t00",
        "step": 5,
        "epoch": 1,
        "S": 9.0,
        "alive_pairs": 20,
        "loss": 1.0,
        "img_per_s": 64,
    }
    _write(out / "search" / "t00" / "metrics.jsonl", [row])
    (out / "retrain").mkdir()  # the queued emission: counted by known_trials, no trial row yet
    board.poll()
    line = board.line()
    eta = re.search(r"ETA (\d+)m(\d+)s\+", line)
    assert eta and 50 <= 60 * int(eta[1]) + int(eta[2]) <= 70, line
    assert "retrain 0.0/1 epochs" in line, line


def test_a_skipped_architecture_is_announced_once_and_not_counted_as_done(tmp_path):
    from pipeline.progress import Board

    out = tmp_path
    (out / "retrain").mkdir()
    (out / "retrain" / "b.skipped.json").write_text(
        json.dumps({"arch_id": "b", "near": "a", "macs": 22.61e6, "near_macs": 23.36e6, "gap": 0.05})
    )
    stream = io.StringIO()
    board = Board(out, search_steps=10, epochs_per_trial=1, known_trials=lambda: 1, searches=["t00"],
                  stream=stream)  # fmt: skip
    board.poll()
    board.poll()  # a second look at the same file says nothing more
    line = board.line()
    assert "(0 running, 0 done)" in line, line
    said = [n for n in board._notes if "not retrained" in n]
    assert said == ["[retrain] b not retrained: 22.61 MMACs, within 5 % of a (23.36), which is retrained "
                    "(retrain.min_macs_gap)"], said  # fmt: skip
