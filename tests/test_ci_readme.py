"""``.ci/readme_command.py``, which hands CI the README's quick-start lines verbatim: both markers parse to one
command each, and a README edit that removes, repeats or splits them is an error (CI red), not a silent skip."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_readme_command", ROOT / ".ci" / "readme_command.py")
readme_command = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_command)


def test_the_readme_holds_both_quick_start_lines():
    readme = (ROOT / "README.md").read_text()
    main_job, tests = (readme_command.command(readme, name) for name in ("main-job", "tests"))
    assert main_job.endswith("fastjac demo") and tests.endswith("python -m pytest tests -q")
    assert main_job.split(" && ")[:2] == tests.split(" && ")[:2]      # the same install in both


@pytest.mark.parametrize("text,match", [
    ("no marker here", "exactly once"),
    ("<!-- ci: tests -->\n```bash\na\n```\n<!-- ci: tests -->\n```bash\nb\n```", "exactly once"),
    ("<!-- ci: tests -->\nsome prose\n```bash\na\n```", "followed by a ```bash block"),
    ("<!-- ci: tests -->\n```bash\npip install x\npytest\n```", "one command line"),
])
def test_a_broken_marker_fails(text, match):
    with pytest.raises(SystemExit, match=match):
        readme_command.command(text, "tests")
