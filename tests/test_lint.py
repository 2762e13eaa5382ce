"""Repository hygiene: ruff is clean, and .ci/run runs exactly the README's test command."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed (it is part of the [test] extra)")
    done = subprocess.run([ruff, "check", "onnxlrp", "passes", "tests", "tools"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"    {ci}\n" in readme, "the last line of .ci/run must be the README's test command"


def test_every_package_is_shipped():
    """Every Python package folder of ``onnxlrp`` and ``passes`` (shipped as ``onnxlrp.passes``) is listed in
    pyproject's ``packages``: an unlisted one (``onnxlrp.passes.ops`` until 78ed055) is missing from the wheel, and
    the installed compiler cannot import its op registry."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top, name in (("onnxlrp", "onnxlrp"), ("passes", "onnxlrp.passes")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join([name, *parts]))
    assert found <= listed, f"not shipped: {sorted(found - listed)}"
