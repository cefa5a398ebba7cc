"""The model and batch every benchmark measures on: a preset with random weights and the byte
tokenizer (no download), and `batch_size` bundled SST-2 sample examples, encoded as a run encodes them."""

from __future__ import annotations


def benchmark_config(model_name: str, device: str, overrides=()):
    """The run config of a benchmark: the preset with random weights, the byte tokenizer, bundled samples."""
    from zobench.configs import compose

    return compose([f"model={model_name}", "model.init=random", "model.tokenizer=byte", "task.samples=true",
                    f"device={device}", *overrides])


def benchmark_setup(model_name: str, batch_size: int, device: str, overrides=()):
    """Returns (cfg, model, tokenizer, encoded examples, device)."""
    from omegaconf import OmegaConf

    from zobench.build import build_model
    from zobench.data import load_split_pools
    from zobench.encoding import Encoder
    from zobench.spec import RunSpec
    from zobench.tasks import PromptTemplate

    cfg = benchmark_config(model_name, device, overrides)
    spec = RunSpec.from_cfg(cfg)
    dev = spec.device
    model, tokenizer, _ = build_model(spec)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    pools, _ = load_split_pools(task)
    template, encoder = PromptTemplate(task), Encoder(tokenizer, 512)
    rows = [pools["train"][i % len(pools["train"])] for i in range(batch_size)]
    return cfg, model, tokenizer, [encoder.encode(template.render(r)) for r in rows], dev


def run_self(script: str, *args: str, env=None, timeout: float | None = None) -> dict:
    """`python SCRIPT ARGS` in a fresh process (a peak of its own), its last stdout line read as JSON; a
    failure raises with the child's stderr."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
