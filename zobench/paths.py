"""Where the Hydra config tree (conf/) and the task definitions (tasks/) live.

In a source checkout or an editable install they are the top-level folders of the repository;
in a wheel (`pip install .`) they are shipped inside the package as zobench/_conf and zobench/_tasks.
The papers' reference numbers (results/reference/) travel the same way, as zobench/_reference.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str, source: str | None = None) -> Path:
    """The installed copy (zobench/_<name>) or the source tree's folder (<repo>/<source or name>)."""
    for candidate in (PACKAGE_DIR / f"_{name}", PACKAGE_DIR.parent / (source or name)):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"zobench is installed without its '{source or name}/' folder (looked in {PACKAGE_DIR})")


def conf_dir() -> Path:
    return _resource_dir("conf")


def tasks_dir() -> Path:
    return _resource_dir("tasks")


def reference_dir() -> Path:
    return _resource_dir("reference", "results/reference")
