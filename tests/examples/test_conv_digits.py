"""Smoke test of examples/conv_digits.py (``--quick``: a 46-region conv decoder, 40 images, a few seconds)."""
import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "examples"
#: Allowed rise of EM's exact NLL per datum between steps: EM's own acceptance tolerance (1e-12 relative to
#: Σ|log p|, here ~1e-11 nats per datum) with margin.
MONOTONE_TOL = 1e-9


def _load_example():
    spec = importlib.util.spec_from_file_location("pyro_cpa_example_conv_digits", ROOT / "conv_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_conv_digits_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    mod = _load_example()
    args = mod.parse_args(["--quick", "--out", str(tmp_path)])
    result = mod.main(args)
    out = capsys.readouterr().out
    assert "loglik test" in out and "EM (exact)" in out and "VAE (AmortizedNormal)" in out

    saved = json.loads((tmp_path / "conv_digits.json").read_text())
    assert saved == json.loads(json.dumps(result))                  # main returns what it saves
    assert saved["n_train"] == args.train and saved["n_test"] == args.test and saved["D"] == 64
    # one hidden ReLU layer of C·9 units, each a line in the latent plane: an arrangement of 9C lines in general
    # position (for the --quick seed the closest pair intersection is 0.018 from a third line and the smallest
    # |sin| of an angle 0.0027, far above any rounding), hence 1 + n + C(n, 2) regions
    n_lines = 9 * args.channels
    assert saved["regions_exact"] and saved["regions_initial"] == 1 + n_lines + n_lines * (n_lines - 1) // 2
    em, vae = saved["em"], saved["vae"]
    assert em["steps"] == args.steps and vae["steps"] == args.vae_steps          # budgets in steps
    for m in (em, vae):
        assert all(math.isfinite(m[k]) for k in ("train_ll", "test_ll", "obs_scale", "seconds"))
        assert m["test_ll"] == pytest.approx(-m["test_nll"]) and m["regions"] >= 1
    assert vae["elbo"] <= vae["train_ll"] + 1e-8                                   # ELBO <= exact log p(x)
    h = saved["em_nll_history"]
    assert len(h) == args.steps + 1 and all(b <= a + MONOTONE_TOL for a, b in zip(h, h[1:]))
    assert em["train_ll"] == pytest.approx(-h[-1])

    fig = tmp_path / "conv_digits_latent.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert fig.stat().st_size > 10_000 and saved["figures"] == [str(fig)]
    else:
        assert not fig.exists() and "matplotlib" in out
