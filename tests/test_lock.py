"""requirements.lock agrees with pyproject.toml: every declared dependency is pinned, within its range."""

import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lockfile", ROOT / "tools" / "lockfile.py")
lockfile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lockfile)


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["test"]
    return [Requirement(r) for r in names + project["tool"]["chatexaonepath"]["lock"]["no-deps"]]


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_range(requirement):
    pins = lockfile.read_lock()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement.name} is declared in pyproject.toml but not locked: run `make lock`"
    assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (
        f"the lock pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}: run `make lock`")


def test_lock_pins_torch_as_the_cpu_build_and_says_how_it_was_made():
    text = (ROOT / "requirements.lock").read_text()
    assert lockfile.read_lock()["torch"].endswith("+cpu")
    assert "make lock" in text.splitlines()[1] and not any(line.startswith("nvidia-") for line in text.splitlines())


def test_check_accepts_the_locked_environment_and_names_every_difference(tmp_path, monkeypatch, capsys):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nalpha==1.0\n    # via x\nbeta-pkg==2.0+cpu ; python_version >= '3'\n")
    monkeypatch.setattr(lockfile, "LOCK", lock)
    monkeypatch.setattr(lockfile, "installed", lambda python: {"alpha": "1.0", "beta-pkg": "2.0+cpu", "pip": "23"})
    assert lockfile.check("python") == 0
    monkeypatch.setattr(lockfile, "installed", lambda python: {"alpha": "1.1", "gamma": "3", "chatexaonepath": "0"})
    assert lockfile.check("python") == 1
    err = capsys.readouterr().err
    assert "alpha: locked 1.0, installed 1.1" in err and "beta-pkg: locked 2.0+cpu, installed nothing" in err
    assert "gamma: installed 3, not in the lock" in err and "chatexaonepath" not in err


def test_the_running_environment_equals_the_lock_when_built_by_make_setup():
    """`make setup`'s environment is the lock exactly; the drift check's (.venv-latest) is deliberately not."""
    import sys

    if not (Path(sys.prefix) / ".installed").exists():
        pytest.skip("not the environment make setup built (the drift check, or a hand-made venv)")
    assert lockfile.check(sys.executable) == 0
