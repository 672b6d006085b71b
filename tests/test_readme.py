"""The README's usage example runs as written, and .ci/run runs the README's test command."""
import contextlib
import io
import math
import pathlib
import re

import pyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"(-?[0-9.]+(?:e[+-]?[0-9]+)?|nan|-?inf)"
README_RTOL = 0.02


def test_readme_usage_example_fits_three_copies_and_prints_three_exact_nlls():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    pyro.clear_param_store()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    m = re.search(rf"EM {NUMBER}, exact MLE {NUMBER}, SVI \+ AutoNormal {NUMBER}", printed)
    assert m, f"the example must print the three exact NLLs side by side; it printed:\n{printed}"
    em, mle, svi = (float(v) for v in m.groups())
    assert math.isfinite(em) and math.isfinite(mle) and math.isfinite(svi)
    # each fit has its own copy of the model: EM's exact fit is not damaged by the later SVI fit
    assert em <= svi
    assert re.search(rf"exact KL\(q \|\| p\(z\|x\)\) of AutoNormal: {NUMBER}", printed)
    # the numbers the README quotes are the ones the example prints (within README_RTOL: another CPU's rounding
    # may move the fits' last digits; a change of the EM schedule moves them by far more)
    quoted = re.search(rf"about `EM {NUMBER}, exact MLE {NUMBER},\s+SVI \+ AutoNormal {NUMBER}`", text)
    assert quoted, "the README must quote the example's output ('about `EM ..., exact MLE ..., SVI + AutoNormal ...`')"
    for got, said in zip((em, mle, svi), (float(v) for v in quoted.groups())):
        assert abs(got - said) <= README_RTOL * abs(said), (got, said)


def test_ci_runs_the_readme_test_command():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    assert test_cmd[0].strip() in (ROOT / ".ci" / "run").read_text()
