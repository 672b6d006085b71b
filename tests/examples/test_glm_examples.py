"""Smoke tests of the GLM examples (tiny --quick mode)."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_glm_mle_b_quick():
    mod = _load("glm_mle_b")
    out = mod.main(mod.parse_args(["--quick", "--threads", "0"]))
    (res,) = out.values()
    assert res["mle_b_above_early"]
    assert res["curves"]["mle-b"][0] > res["curves"]["he"][0]


def test_glm_active_units_quick():
    pytest.importorskip("sklearn")
    mod = _load("glm_active_units")
    rows = mod.main(mod.parse_args(["--quick", "--threads", "0"]))
    assert [r["beta"] for r in rows] == [1.0, 4.0]
    assert all(0 <= r["predicted"] <= 5 and 0 <= r["measured"] <= 5 for r in rows)
