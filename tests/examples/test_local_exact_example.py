"""Smoke test of examples/local_exact.py (``--quick``: small decoders where the global partition also runs)."""
import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "examples"


def test_local_exact_quick(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("pyro_cpa_example_local_exact", ROOT / "local_exact.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(mod.parse_args(["--quick", "--out", str(tmp_path)]))
    assert list(tmp_path.glob("*.json"))
    assert len(result["cases"]) == 2
    for row in result["cases"]:
        assert math.isfinite(row["mean_log_p"]) and 0 < row["pairs_integrated"] <= row["pairs"]
        assert row["median_log_bound"] <= row["max_log_bound"] <= -40.0     # certified neglected fraction
        assert len(row["log_bound"]) == row["N"] == 40
        assert row["max_abs_diff_global"] <= 1e-10                # same log p as the global partition
        assert row["points_per_s"] == pytest.approx(row["N"] / row["seconds"])
