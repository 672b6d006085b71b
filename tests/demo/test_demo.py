import json
import math
import os

from pyro_cpa.demo import main


def test_demo_quick_writes_table_json_and_figures(tmp_path, capsys):
    out = tmp_path / "figs"
    js = tmp_path / "demo.json"
    experiment = main(["demo", "--quick", "--out", str(out), "--json", str(js), "--no-progress"])
    printed = capsys.readouterr().out
    assert "exact NLL" in printed and "EM (exact)" in printed
    data = json.loads(js.read_text())
    names = [m["name"] for m in data["methods"]]
    assert names[0] == "EM (exact)" and any("VAE" in n for n in names) and any("mixture" in n for n in names)
    for m in data["methods"]:
        for key in ("final_nll", "wall_clock_s", "steps", "nll_history", "num_regions"):
            assert key in m
        assert math.isfinite(m["final_nll"]) and m["steps"] > 0 and m["num_regions"] >= 1
    em = data["methods"][0]
    # EM's exact NLL never increases
    nll = [h[2] for h in em["nll_history"]]
    assert all(b <= a + 1e-9 * max(1, abs(a)) for a, b in zip(nll, nll[1:]))
    for name in ("fig3_partition.png", "fig3_density.png", "fig3_posterior.png", "fig4_nll.png", "fig5_kl.png",
                 "fig6_manifolds.png"):
        assert os.path.getsize(out / name) > 10_000
    assert len(experiment["results"]) == 8
    assert experiment["results"][-1].name.endswith("on EM decoder")


def test_console_entry_point_exits_zero(tmp_path, monkeypatch):
    import sys

    from pyro_cpa.demo.cli import console

    monkeypatch.setattr(sys, "argv", ["pyro-cpa", "demo", "--quick", "--no-figures", "--no-progress",
                                      "--out", str(tmp_path)])
    assert console() == 0
