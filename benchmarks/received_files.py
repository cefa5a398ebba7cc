"""The cost of treating received files as data (issue 18), measured side by side in one process:

- template rendering on a budget (zobench/render_budget.py) against Jinja's plain immutable sandbox, over every
  bundled task's sample rows (the prompt template of each);
- the SHA-256 of checkpoint and best-weights files (run_dir.file_sha256), in CPU seconds per GiB;
- reading a long log.jsonl through safe_files.read_jsonl (depth, number and size checks per line) against
  json.loads of each line.

    python benchmarks/received_files.py [--repeats 5] [--hash-mib 256] [--log-lines 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def best_of(repeats: int, work) -> float:
    """The least CPU time of `repeats` runs: the machine is shared, the minimum is the least disturbed."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return min(times)


def rendering(repeats: int) -> tuple[float, float, int]:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from omegaconf import OmegaConf

    from zobench.configs import compose
    from zobench.data import load_split_pools
    from zobench.render_budget import budget
    from zobench import tasks
    from zobench.tasks import _ENV, task_names

    plain_env = ImmutableSandboxedEnvironment(keep_trailing_newline=True)  # zobench's filters, unbudgeted
    plain_env.filters.update({name: getattr(tasks, name) for name in
                              ("boolq_question", "copa_premise", "copa_choice", "record_passage", "record_options")})
    work = []
    for name in task_names():
        task = OmegaConf.to_container(compose([f"task={name}", "task.samples=true"]).task, resolve=True)
        pools, _ = load_split_pools(task)
        rows = [row for pool in pools.values() for row in pool]
        work.append((_ENV.from_string(task["prompt"]), plain_env.from_string(task["prompt"]), rows))

    def budgeted():
        for template, _, rows in work:
            for row in rows:
                with budget():
                    template.render(**row)

    def plain():
        for _, template, rows in work:
            for row in rows:
                template.render(**row)

    n_rows = sum(len(rows) for _, _, rows in work)
    return best_of(repeats, budgeted), best_of(repeats, plain), n_rows


def hashing(mib: int) -> float:
    from zobench.run_dir import file_sha256

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        with open(path, "wb") as handle:
            for _ in range(mib):
                handle.write(os.urandom(1 << 20))
        file_sha256(path)  # the page cache warm, as right after a checkpoint is written
        seconds = best_of(3, lambda: file_sha256(path))
    return seconds * 1024 / mib


def log_reading(lines: int, repeats: int) -> tuple[float, float]:
    from zobench.safe_files import read_jsonl

    record = {"event": "train", "step": 1, "loss": 0.6931, "lr": 1e-6, "elapsed_s": 12.5, "forward_passes": 2}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "log.jsonl"
        path.write_text("".join(json.dumps({**record, "step": i}) + "\n" for i in range(lines)))
        checked = best_of(repeats, lambda: read_jsonl(path))
        plain = best_of(repeats, lambda: [json.loads(line) for line in path.read_text().splitlines()])
    return checked, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hash-mib", type=int, default=256)
    parser.add_argument("--log-lines", type=int, default=100_000)
    args = parser.parse_args()
    budgeted, plain, n_rows = rendering(args.repeats)
    print(f"rendering {n_rows} sample rows: budgeted {budgeted * 1e6 / n_rows:.1f} us/row, plain sandbox "
          f"{plain * 1e6 / n_rows:.1f} us/row, ratio {budgeted / plain:.3f}")
    print(f"SHA-256 of a {args.hash_mib} MiB file: {hashing(args.hash_mib):.2f} CPU s per GiB")
    checked, plain_log = log_reading(args.log_lines, args.repeats)
    print(f"log.jsonl of {args.log_lines} lines: safe_files.read_jsonl {checked:.2f} s, json.loads per line "
          f"{plain_log:.2f} s, ratio {checked / plain_log:.2f}")


if __name__ == "__main__":
    main()
