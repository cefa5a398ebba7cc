"""Where the report writes: file names made from run data (a task's name in metrics.json) never leave the output
folder, and nothing is written through a link.

metrics.json files travel between clusters and colleagues; a `task` of "../../x" must not write ../../x.png,
and a received folder's `report -> /some/dir` (or `report/runs.md -> ~/.bashrc`) must not choose what is
overwritten: the output folder, plots/ and every file are refused when they are links (safe_files).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..safe_files import open_for_write, refuse_link

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_stem(name: object) -> str:
    """`name` itself when it is a plain file name (sst2, opt-13b); otherwise its plain characters and a short
    hash of the original, so two odd names never share a file."""
    text = str(name)
    if _PLAIN.fullmatch(text) and ".." not in text:
        return text
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:60] or "unnamed"
    return f"{plain}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def output_folder(out_dir: Path) -> Path:
    """The report's folder (or its plots/), made if new; refused if it is a link (the last component, which the
    report creates: links higher up the path the user typed are the user's)."""
    out_dir = Path(out_dir)
    refuse_link(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def output_file(out_dir: Path, name: object, suffix: str) -> Path:
    """out_dir/<safe name><suffix>, checked to lie inside out_dir (open it with safe_files.open_for_write)."""
    path = Path(out_dir) / f"{safe_stem(name)}{suffix}"
    if path.parent.resolve() != Path(out_dir).resolve():
        raise ValueError(f"refusing to write {path}: outside {out_dir}")  # cannot happen for a safe stem
    return path


def write_output(out_dir: Path, name: object, suffix: str, write) -> Path:
    """`write(handle)` into out_dir/<safe name><suffix>, opened without following a link (binary for .png)."""
    path = output_file(out_dir, name, suffix)
    binary = suffix == ".png"
    with open_for_write(path, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) \
            as handle:
        write(handle)
    return path
