"""The end-to-end part of benchmarks/gpu_check.sh: `zobench` itself, as a user runs it, on a random-init preset.

- every optimizer in fp16 and in bf16 (one `zobench -m` sweep: one process, one import);
- a resume: MeZO and Adam killed (SIGKILL) mid-run, resumed by the same command, against an uninterrupted run
  (the tested weights bit for bit; Adam's backward may use atomics on CUDA, so its difference is reported);
- a replay: `zobench-replay` of the uninterrupted MeZO run against the weights it tested;
- with two GPUs or more: MeZO and IP-SGD with model.device_map=auto;
- a table of every run: status, steps, test metric, peak memory, training seconds.

    python benchmarks/gpu_check_runs.py --device cuda --model opt-125m --out DIR
    python benchmarks/gpu_check_runs.py --device cpu --model opt-tiny --out DIR --steps 4   # the dry run

Exit status 1 when a run fails or a zeroth-order resume or replay differs from the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OPTIMIZERS = ("mezo", "addax", "sparse_mezo", "adamezo", "zo_adam", "zo_sgd_momentum", "zo_sgd_sign",
              "zo_sgd_sign_plain", "sgd", "adam", "ip_sgd", "head_tuning", "lp", "zero_shot")
DTYPES = ("float16", "bfloat16")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def common(args) -> list[str]:
    """The overrides of every run: random weights of the preset's size, the byte tokenizer, bundled samples."""
    return [f"model={args.model}", "model.init=random", "model.tokenizer=byte", "task=sst2", "task.samples=true",
            "data.n_train=32", "data.n_dev=16", "data.n_test=32", "max_length=128", "train.batch_size=8",
            "train.log_interval=1", "eval.batch_size=16", f"device={args.device}"]


def zobench(*overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zobench.cli", *overrides], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def sweep(args) -> bool:
    """Every optimizer in both 16-bit dtypes; False if a job did not complete."""
    done = zobench("-m", *common(args), f"optimizer={','.join(OPTIMIZERS)}", f"dtype={','.join(DTYPES)}",
                   f"train.steps={args.steps}", "train.eval_interval=0", f"hydra.sweep.dir={args.out / 'sweep'}")
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-3000:], sep="\n")
    return done.returncode == 0


def resume(args, optimizer: str) -> bool:
    """Killed mid-run and resumed by the same command, against one go: equal tested weights (ZO: required)."""
    steps = args.steps * 10
    lr = ["optimizer.lr=1e-4"] if optimizer == "adam" else []
    settings = [*common(args), f"optimizer={optimizer}", *lr, "dtype=float16", f"train.steps={steps}",
                f"train.eval_interval={steps // 2}", f"checkpoint.every={max(steps // 10, 1)}", "save_model=true"]
    whole, broken = args.out / f"resume-{optimizer}-whole", args.out / f"resume-{optimizer}-killed"
    if zobench(*settings, f"hydra.run.dir={whole}").returncode != 0:
        print(f"resume {optimizer}: the uninterrupted run failed (see {whole}/zobench.log)")
        return False
    process = subprocess.Popen([sys.executable, "-m", "zobench.cli", *settings, f"hydra.run.dir={broken}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    trajectory, deadline = broken / "trajectory.jsonl", time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if trajectory.exists() and trajectory.read_text().count("\n") >= steps * 6 // 10:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    if process.wait() == 0:
        print(f"resume {optimizer}: the run ended before the kill; nothing was resumed (raise --steps)")
        return False
    killed_at = json.loads((broken / "metrics.json").read_text())["steps"]
    again = zobench(*settings, f"hydra.run.dir={broken}")
    if again.returncode != 0:
        print(f"resume {optimizer}: the resumed run failed: {again.stderr.strip()[-500:]}")
        return False
    same, note = compare(whole / "model", broken / "model")
    print(f"resume {optimizer:<6} killed at step {killed_at}/{steps}, resumed: tested weights {note}")
    return same or optimizer != "mezo"


def replay(args) -> bool:
    """zobench-replay of the uninterrupted MeZO run rebuilds the weights it tested."""
    run = args.out / "resume-mezo-whole"
    done = subprocess.run([sys.executable, "-m", "zobench.replay", str(run), "--out", str(args.out / "replayed")],
                          capture_output=True, text=True, timeout=600, env=ENV)
    if done.returncode != 0:
        print(f"replay: failed: {done.stderr.strip()[-500:]}")
        return False
    same, note = compare(run / "model", args.out / "replayed")
    print(f"replay mezo: rebuilt weights {note}")
    return same


def device_map(args) -> bool:
    """MeZO and IP-SGD over every visible GPU (accelerate's device map)."""
    ok = True
    for optimizer in ("mezo", "ip_sgd"):
        done = zobench(*common(args), f"optimizer={optimizer}", "dtype=float16", "model.device_map=auto",
                       f"train.steps={args.steps}", "train.eval_interval=0",
                       f"hydra.run.dir={args.out / f'device-map-{optimizer}'}")
        print(f"device_map=auto {optimizer}: exit {done.returncode} {done.stderr.strip()[-300:]}")
        ok = ok and done.returncode == 0
    return ok


def compare(first: Path, second: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(str(folder / "model.safetensors")) for folder in (first, second))
    if a.keys() != b.keys():
        return False, "DIFFER (other tensors)"
    worst = max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)
    if all(torch.equal(a[k], b[k]) for k in a):
        return True, "bit-identical"
    return False, f"DIFFER (max |difference| {worst:.3g})"


def table(out: Path) -> bool:
    """Every run's figures; False if one did not complete."""
    def order(path: Path):  # a sweep's jobs by number, then the single runs
        number = path.parent.name.split("_")[0]
        return str(path.parent.parent), int(number) if number.isdigit() else -1, path.parent.name

    rows = [json.loads(p.read_text()) | {"dir": p.parent.name} for p in sorted(out.rglob("metrics.json"), key=order)]
    print(f"{'run':<40}{'dtype':<10}{'status':<11}{'steps':>6}{'test':>8}{'peak GiB':>10}  {'peak by':<20}"
          f"{'train s':>8}")
    for row in rows:
        test = "-" if row.get("test_metric") is None else f"{row['test_metric']:.3f}"
        peak = "-" if row.get("peak_memory_bytes") is None else f"{row['peak_memory_bytes'] / 2**30:.2f}"
        train = "-" if row.get("train_wall_clock_s") is None else f"{row['train_wall_clock_s']:.1f}"
        print(f"{row['dir'][:39]:<40}{str(row.get('dtype')):<10}{row['status']:<11}{row['steps']:>6}{test:>8}"
              f"{peak:>10}  {str(row.get('peak_memory_method')):<20}{train:>8}")
        if row["status"] != "completed":
            print(f"    {row['error']}")
    return bool(rows) and all(row["status"] == "completed" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--steps", type=int, default=20, help="steps of each sweep run (a resume runs 10x)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, ok = time.monotonic(), True
    for name, part in (("sweep", sweep), ("resume mezo", lambda a: resume(a, "mezo")),
                       ("resume adam", lambda a: resume(a, "adam")), ("replay", replay)):
        began = time.monotonic()
        passed = part(args)
        ok = ok and passed
        print(f"-- {name}: {'ok' if passed else 'FAILED'} in {time.monotonic() - began:.0f} s", flush=True)
    if args.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() >= 2:
            ok = device_map(args) and ok
        else:
            print("-- device_map=auto: skipped (one GPU)")
    ok = table(args.out) and ok
    print(f"end to end: {'ok' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s ({args.out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
