"""The README's usage example runs as written, and .ci/run runs the README's test command."""
import pathlib
import re

import pyro

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    pyro.clear_param_store()
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    assert test_cmd[0].strip() in (ROOT / ".ci" / "run").read_text()
