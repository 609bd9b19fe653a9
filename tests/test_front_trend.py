"""`dnad.results.front_trend`: the accuracy-vs-MACs slope of a family and the retraining noise that
repeats measure (the console summary's last line)."""

import math

import numpy as np
import pandas as pd
import pytest
from test_figures import make_run_folder

from dnad.report import build_report_html
from dnad.results import front_trend, load_run, summary_table


def _archs(macs, val, status=None, repeats=None, sd=None, mean=None) -> pd.DataFrame:
    n = len(macs)
    return pd.DataFrame({
        "arch_id": [f"a{i}" for i in range(n)], "trial_id": "t00", "emission_index": range(n),
        "alive_pairs": 10, "params": 1000, "macs": macs, "val_acc": val, "test_acc": val,
        "status": status or ["ok"] * n, "repeats": repeats or [1] * n,
        "val_acc_sd": sd or [np.nan] * n, "val_acc_mean": mean or val,
        "is_pareto_macs": False, "is_pareto_params": False, "is_pareto_latency": False,
        "latency_ms_onnx": 1.0, "latency_ms_torch": 2.0,
    })  # fmt: skip


def test_the_slope_is_points_per_doubling_of_macs():
    # 0.80, 0.81, 0.82 at 1, 2, 4 MMACs: one point per doubling, a perfect line
    t = front_trend(_archs([1e6, 2e6, 4e6], [0.80, 0.81, 0.82]))
    assert t is not None
    assert t.architectures == 3 and t.macs_span == pytest.approx(4.0)
    assert t.slope == pytest.approx(1.0) and t.r == pytest.approx(1.0) and t.spread == pytest.approx(2.0)
    assert t.noise_sd is None and "retrain.repeats=2" in t.describe()


def test_a_family_whose_cheaper_members_do_better_has_a_negative_slope():
    t = front_trend(_archs([1e6, 2e6, 4e6, 8e6], [0.86, 0.85, 0.85, 0.84]))
    assert t is not None and t.slope < 0 and t.r < 0


def test_failed_rows_are_left_out_and_too_few_architectures_give_none():
    archs = _archs([1e6, 2e6, 4e6], [0.80, 0.81, float("nan")], status=["ok", "ok", "failed"])
    assert front_trend(archs) is None
    assert front_trend(_archs([2e6, 2e6, 2e6], [0.8, 0.81, 0.82])) is None  # no spread of MACs
    assert front_trend(_archs([], [])) is None
    unknown = _archs([1e6, 2e6, 4e6, 8e6], [0.80, 0.81, 0.82, 0.5]).astype({"status": "string"})
    unknown.loc[3, "status"] = pd.NA  # a row whose status is missing counts as not retrained
    assert front_trend(unknown).slope == pytest.approx(1.0)
    flat = front_trend(_archs([1e6, 2e6, 4e6], [0.8, 0.8, 0.8]))
    assert flat is not None and flat.slope == pytest.approx(0.0, abs=1e-9) and math.isnan(flat.r)


def test_repeats_give_the_mean_its_slope_and_a_pooled_noise():
    # repeat 0 alone would slope downwards; the means slope upwards by 0.5 points per doubling
    archs = _archs([1e6, 2e6, 4e6], [0.82, 0.80, 0.80], repeats=[2, 2, 3], sd=[0.003, 0.004, 0.005],
                   mean=[0.800, 0.805, 0.810])  # fmt: skip
    t = front_trend(archs)
    assert t is not None and t.slope == pytest.approx(0.5)
    pooled = math.sqrt((0.003**2 + 0.004**2 + 2 * 0.005**2) / 4)
    assert t.noise_sd == pytest.approx(100 * pooled)
    assert f"sd {100 * pooled:.2f} points" in t.describe()


def test_the_summary_ends_with_the_trend():
    text = summary_table(_archs([1e6, 2e6, 4e6], [0.80, 0.81, 0.82]))
    assert text.splitlines()[-1].startswith("trend: +1.00 validation-accuracy points per doubling of MACs")
    assert "trend" not in summary_table(_archs([1e6, 2e6], [0.80, 0.81]))


def test_the_summary_says_which_rows_were_skipped_or_failed_rather_than_calling_all_failed():
    text = summary_table(_archs([1e6, 2e6, 4e6], [0.80, np.nan, np.nan], status=["ok", "skipped", "failed"]))
    rows = {line.split()[0]: line for line in text.splitlines()[1:4]}
    assert "80.00%" in rows["a0"] and " skipped " in rows["a1"] and " failed " in rows["a2"], text


def test_the_report_states_the_trend(tmp_path):
    archs = make_run_folder(tmp_path / "run")
    t = front_trend(archs)
    assert t is not None
    text = build_report_html(load_run(tmp_path / "run"))
    assert f"{t.slope:+.2f} val points per doubling of MACs ({t.macs_span:.2f}x MACs" in text
