"""The model zoo's code format checks on every generated bundle: flake8 (with the zoo's plugins), black and isort at
line length 120, run as the zoo's ``./runtests.sh --codeformat`` runs them, with the zoo's settings, which this
repository keeps in ``setup.cfg`` ([flake8], [isort]) and ``pyproject.toml`` ([tool.black]); and the zoo's
pre-commit file hygiene (end-of-file-fixer, trailing-whitespace) on every text file under ``bundles/``.

A failure prints the tool's own report. Fix the sources in ``bundles/template`` or ``bundles/methods/<method>``
(``black``/``isort`` with the same settings do most of it), then run ``scripts/generate_bundles.py``.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLES = sorted(p for p in (REPO / "bundles").glob("*_segmentation") if p.is_dir())
SETUP_CFG = REPO / "setup.cfg"
PYPROJECT = REPO / "pyproject.toml"

# The zoo's settings (https://github.com/Project-MONAI/model-zoo, branch dev, commit dfae206: setup.cfg,
# pyproject.toml, runtests.sh). Asserted here so that the checks cannot be made green by loosening the settings.
ZOO_FLAKE8 = {
    "select": "B,C,E,F,N,P,T4,W,B9",
    "max_line_length": "120",
    "ignore": "E203 E501 E741 W503 W504 C408 N812 B023 B905 B028 B907 C419",
}
ZOO_ISORT = {"known_first_party": "models", "profile": "black", "line_length": "120"}
ZOO_BLACK = {"line-length": 120, "target-version": ["py37", "py38", "py39"], "skip-magic-trailing-comma": True}
# The flake8 plugins of the zoo's requirements-dev.txt (pinned in requirements.txt).
ZOO_FLAKE8_PLUGINS = ("flake8-bugbear", "flake8-comprehensions", "flake8-executable", "pep8-naming")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_clean(proc: subprocess.CompletedProcess, what: str, fix: str) -> None:
    report = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        pytest.fail(f"{what} fails (exit {proc.returncode}); {fix}:\n{report}", pytrace=False)


def test_settings_are_the_model_zoos():
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    assert {k: " ".join(cfg["flake8"][k].replace(",", " ").split()) if k == "ignore" else cfg["flake8"][k].strip()
            for k in ZOO_FLAKE8} == ZOO_FLAKE8
    assert "extend-ignore" not in cfg["flake8"] and "extend_ignore" not in cfg["flake8"]
    assert {k: cfg["isort"][k].strip() for k in ZOO_ISORT} == ZOO_ISORT
    black = tomllib.loads(PYPROJECT.read_text())["tool"]["black"]
    assert {k: black.get(k) for k in ZOO_BLACK} == ZOO_BLACK
    version = run_tool("flake8", "--version")
    assert version.returncode == 0, version.stderr
    for plugin in ZOO_FLAKE8_PLUGINS:
        assert plugin in version.stdout, f"flake8 plugin {plugin} is not installed: pip install -r requirements.txt"


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_flake8(bundle: Path):
    proc = run_tool("flake8", "--config", str(SETUP_CFG), "--count", "--statistics", str(bundle))
    assert_clean(proc, f"flake8 on {bundle.name}", "fix the findings in the template or method sources")


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_black(bundle: Path):
    proc = run_tool("black", "--config", str(PYPROJECT), "--check", "--diff", "--quiet", str(bundle))
    assert_clean(proc, f"black --check on {bundle.name}",
                 "run .venv/bin/black on the template or method sources (settings: pyproject.toml)")


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_isort(bundle: Path):
    proc = run_tool("isort", "--settings-path", str(SETUP_CFG), "--check-only", "--diff", str(bundle))
    assert_clean(proc, f"isort --check-only on {bundle.name}",
                 "run .venv/bin/isort on the template or method sources (settings: setup.cfg)")


def text_files() -> list[Path]:
    """Every text file of the bundles, generated ones and their sources (template, methods); caches skipped."""
    files = []
    for path in sorted((REPO / "bundles").rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or any(p.startswith(".") for p in path.parts):
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # weights and other binaries
            continue
        files.append(path)
    return files


def test_docs_end_with_exactly_one_newline():
    """The zoo's end-of-file-fixer hook: a text file ends with one newline, no blank line after it. The Markdown
    docs (bundles/*_segmentation/docs, bundles/methods/*/docs) are the ones that drifted."""
    docs = [*(REPO / "bundles").glob("*_segmentation/docs/*.md"), *(REPO / "bundles").glob("methods/*/docs/*.md")]
    assert docs, "no bundle docs found"
    bad = [str(p.relative_to(REPO)) for p in sorted(set(docs) | set(text_files()))
           if (text := p.read_text(encoding="utf-8")) and (not text.endswith("\n") or text.endswith("\n\n"))]
    assert not bad, ("files not ending with exactly one newline (fix the sources in bundles/template or "
                     f"bundles/methods, then run scripts/generate_bundles.py): {bad}")


def test_no_trailing_whitespace():
    """The zoo's trailing-whitespace hook."""
    bad = [f"{p.relative_to(REPO)}:{i}" for p in text_files()
           for i, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1) if line != line.rstrip()]
    assert not bad, f"trailing whitespace: {bad}"
