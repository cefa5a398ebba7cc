"""File names made from run data (a task's name in metrics.json): never a path that leaves the output folder.

metrics.json files travel between clusters and colleagues; a `task` of "../../x" must not write ../../x.png.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_stem(name: object) -> str:
    """`name` itself when it is a plain file name (sst2, opt-13b); otherwise its plain characters and a short
    hash of the original, so two odd names never share a file."""
    text = str(name)
    if _PLAIN.fullmatch(text) and ".." not in text:
        return text
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:60] or "unnamed"
    return f"{plain}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def output_file(out_dir: Path, name: object, suffix: str) -> Path:
    """out_dir/<safe name><suffix>, checked to lie inside out_dir."""
    path = Path(out_dir) / f"{safe_stem(name)}{suffix}"
    if path.resolve().parent != Path(out_dir).resolve():
        raise ValueError(f"refusing to write {path}: outside {out_dir}")  # cannot happen for a safe stem
    return path
