"""A virtual environment that holds a model's own ``requirements.txt`` and nothing else, as a data scientist's
fresh environment would: the pinned distributions and what they require, each linked from this machine's venv
(which must hold exactly those versions), without downloading gigabytes again. Nothing of the project is
importable there but what the model carries in its ``code/`` folder."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The distributions that ``requirements`` (pinned lines) install, by name, with those they require (extras
    left out); a pin this machine's venv does not hold at that version is an AssertionError naming it."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(line) for line in requirements if line.strip() and not line.startswith("#")]
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        dist = metadata.distribution(requirement.name)
        assert dist.version in requirement.specifier or not requirement.specifier, (
            f"the model needs {requirement}, this venv holds {dist.version}")
        found[name] = dist
        todo += [Requirement(r) for r in dist.requires or ()]
    return found


def model_venv(requirements_file: Path, home: Path) -> Path:
    """A venv at ``home`` with only ``requirements_file``'s closure; returns its python. Its bin holds ``mlflow``,
    ``uvicorn`` and ``gunicorn`` commands (what ``mlflow models serve`` starts)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home)], check=True)
    site = home / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for dist in closure(requirements_file.read_text().splitlines()).values():
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:
            source, target = Path(dist.locate_file(top)), site / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
    python = home / "bin" / "python"
    for command in ("mlflow", "uvicorn", "gunicorn"):
        script = home / "bin" / command
        script.write_text(f'#!/bin/sh\nexec "{python}" -m {command} "$@"\n')
        os.chmod(script, 0o755)
    return python
