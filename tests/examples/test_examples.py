"""Smoke tests of the runnable examples (``--quick``: tiny sizes, a few seconds each)."""
import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _run(name, tmp_path):
    spec = importlib.util.spec_from_file_location(f"pyro_cpa_example_{name}", ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(mod.parse_args(["--quick", "--out", str(tmp_path)]))
    for fig in result.get("figures", []):
        assert pathlib.Path(fig).stat().st_size > 10_000, fig
    assert list(tmp_path.glob("*.json")), "no JSON of the numbers written"
    return result


def _finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_cosine_wave_quick(tmp_path):
    r = _run("cosine_wave", tmp_path)
    em, vae = r["em"], r["vae"]
    assert _finite(em["train_nll"], em["test_nll"], vae["train_nll"], vae["test_nll"], vae["elbo"], vae["kl"])
    assert em["kl"] == 0.0 and em["elbo"] == -em["train_nll"]
    assert vae["kl"] >= -1e-8 and vae["elbo"] <= -vae["train_nll"] + 1e-8          # ELBO <= log p(x)
    h = r["em_nll_history"]
    assert all(b <= a + 1e-9 for a, b in zip(h, h[1:]))                             # EM is monotone
    assert len(r["figures"]) == 1
    assert em["train_nll"] == pytest.approx(min(r["em_restart_nll"]))                # best EM restart kept


def test_digits_quick(tmp_path):
    pytest.importorskip("sklearn")
    r = _run("digits", tmp_path)
    assert r["D"] == 64 and r["n_train"] + r["n_test"] == 50
    for m in (r["em"], r["vae"]):
        assert _finite(m["train_nll"], m["test_nll"], m["obs_scale"]) and m["regions"] >= 1
    assert r["vae"]["kl"] >= -1e-8


def test_model_selection_quick(tmp_path):
    r = _run("model_selection", tmp_path)
    models = r["models"]
    assert len(models) == 4
    names = {m["model"] for m in models}
    assert set(r["picks"].values()) <= names
    for m in models:
        assert _finite(m["train_ll"], m["aic"], m["bic"], m["test_ll"])
        assert m["bic"] > m["aic"]                                   # log N > 2 for N = 60
        assert m["aic"] == pytest.approx(2 * m["k"] - 2 * m["train_ll"])
    for depth in (1, 2):
        ks = [m["k"] for m in models if m["depth"] == depth]
        assert ks == sorted(ks)


def test_anomaly_detection_quick(tmp_path):
    pytest.importorskip("sklearn")
    r = _run("anomaly_detection", tmp_path)
    assert r["n_outliers_test"] > 0
    for key in ("em_log_px", "vae_elbo", "vae_log_px"):
        s = r[key]
        assert _finite(s["auc_train"], s["auc_test"], s["mean_in"], s["mean_out"])
        assert 0.0 <= s["auc_train"] <= 1.0 and 0.0 <= s["auc_test"] <= 1.0
    assert r["em_log_px"]["auc_train"] > 0.5                       # exact log p(x) separates better than chance
    # the per-datum ELBO is a lower bound of the same model's exact log p(x)
    assert r["vae_elbo"]["mean_in"] <= r["vae_log_px"]["mean_in"] + 1e-8


def test_imputation_quick(tmp_path):
    r = _run("imputation", tmp_path)
    assert r["num_hidden"] > 0
    for key in ("em_exact", "vae_iterative", "vae_decoder_exact", "column_mean"):
        assert _finite(r[key]["rmse"]) and r[key]["rmse"] > 0
    assert r["em_exact"]["rmse"] < r["column_mean"]["rmse"]
    assert _finite(r["em_test_nll"], r["vae_test_nll"])


def test_latent_2d_quick(tmp_path):
    r = _run("latent_2d", tmp_path)
    assert _finite(r["train_nll"], r["test_nll"], r["obs_scale"])
    assert r["regions"] >= 2
    assert 0 <= r["bimodal_index"] < 40 and r["posterior_regions_with_mass"] >= 1
