"""Project-level consistency: environment.yml mirrors pyproject.toml; the README's commands are what CI runs."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, req
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(r) for r in meta["dependencies"] + meta["optional-dependencies"]["dev"])
    wanted = {CONDA_NAMES.get(k, k): v for k, v in wanted.items()}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = dict(_split(d) for d in env["dependencies"] if isinstance(d, str) and not d.startswith(("python", "pip")))
    assert listed == wanted


def test_python_requirement_consistent():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    py = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert py == ["python" + meta["requires-python"]]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    setup = next(b for b in blocks if "pip install" in b and "pytest" in b)
    commands = [ln.strip() for ln in setup.splitlines() if ln.strip() and not ln.startswith("#")]
    install = next(c for c in commands if c.startswith("pip install") or "-m pip install" in c)
    test = next(c for c in commands if "pytest" in c)
    assert install in ci and test in ci


def test_pages_workflow_builds_what_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    wf = (ROOT / ".github" / "workflows" / "book.yml").read_text()
    assert "jupyter-book build ." in readme and "jupyter-book build ." in wf
    assert 'pip install -e ".[dev]"' in wf


def test_toc_lists_every_chapter_and_page():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    chapters = sorted(p.with_suffix("").relative_to(ROOT).as_posix() for p in (ROOT / "chapters").glob("*.md"))
    assert chapters == sorted(f for f in files if f.startswith("chapters/"))
    assert len(chapters) == 6
    for f in files:
        assert (ROOT / f"{f}.md").is_file(), f


def test_chapters_are_myst_notebooks_without_committed_ipynb():
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:
        assert tracked.stdout.strip() == "", f"notebooks are generated, not committed: {tracked.stdout}"
    for md in (ROOT / "chapters").glob("*.md"):
        head = md.read_text().split("---")[1]
        meta = yaml.safe_load(head)
        assert meta["jupytext"]["text_representation"]["format_name"] == "myst", md
        assert meta["kernelspec"]["name"] == "python3", md
