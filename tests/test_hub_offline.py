"""Every task's hub dataset and every model preset's hub id, resolved by the real clients, without network.

`datasets.load_dataset(<hub id>, <config>, split=...)` and `from_pretrained(<hub id>)` run as a real run calls
them (zobench.data / zobench.models), against a loopback server in the hub's URL layout (tests/fake_hub.py)
that holds repositories laid out as the hub's do:

- datasets: one parquet file per config and split, named as the hub's parquet conversions name them
  (`<config folder>/<split>-00000-of-00001.parquet`), and a dataset card whose YAML `configs:` maps each
  config's splits to them; rows are the hand-written bundled samples (tasks/samples), in each dataset's schema;
- models: config.json, safetensors weights (sharded with an index for LLaMA) and tokenizer files (OPT: GPT-2
  BPE vocab.json + merges.txt; LLaMA: tokenizer.json), a tiny random model per architecture.

The repositories below are the hub's facts, written here by hand, not derived from tasks/*.yaml or
conf/model/*.yaml: a task or preset naming a repository, config or split the hub does not have fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zobench.paths import conf_dir, tasks_dir
from zobench.tasks import task_names

SUPER_GLUE_SPLITS = ["train", "validation", "test"]
# hub id -> config -> (folder of its files, its splits, the bundled samples in its schema)
DATASETS = {
    "nyu-mll/glue": {"sst2": ("sst2", ["train", "validation", "test"], "sst2")},
    "aps/super_glue": {config: (config, SUPER_GLUE_SPLITS, sample)
                       for config, sample in (("cb", "cb"), ("copa", "copa"), ("multirc", "multirc"),
                                              ("record", "record"), ("rte", "rte"), ("wic", "wic"),
                                              ("wsc", "wsc"), ("wsc.fixed", "wsc"))},
    "google/boolq": {"default": ("data", ["train", "validation"], "boolq")},
    "rajpurkar/squad": {"plain_text": ("plain_text", ["train", "validation"], "squad")},
    "ucinlp/drop": {"default": ("data", ["train", "validation"], "drop")},
}
OPT_REPOS = [f"facebook/opt-{size}" for size in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")]
LLAMA_REPOS = [f"huggyllama/llama-{size}" for size in ("7b", "13b", "30b", "65b")]

# One subprocess serves the repositories, builds them and loads everything through zobench's own loaders.
# A subprocess because the clients read HF_ENDPOINT and the offline switches when they are first imported
# (conftest sets HF_HUB_OFFLINE=1 for every test); the server starts first, so its port is known by then.
PROBE = r"""
import json, os, shutil, sys
from pathlib import Path
request = json.loads(sys.stdin.read())
sys.path.insert(0, request["tests"])
from fake_hub import FakeHub
root = Path(request["root"])
with FakeHub(root) as hub:
    os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
                      HF_HOME=str(root / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                      HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="10", TOKENIZERS_PARALLELISM="false")
    os.environ.pop("HF_TOKEN", None)
    import torch
    from fake_hub import llama_model, opt_model, write_dataset_repo
    from zobench.data import load_split_pools
    from zobench.errors import ZobenchError
    from zobench.models import load_model
    for repo_id, configs in request["datasets"].items():
        write_dataset_repo(root / "datasets" / repo_id, configs, Path(request["samples"]))
    for builder, repos in ((opt_model, request["opt"]), (llama_model, request["llama"])):
        builder(root / "built" / builder.__name__)
        for repo_id in repos:
            shutil.copytree(root / "built" / builder.__name__, root / "models" / repo_id)
    for job in request["jobs"]:
        try:
            if job["kind"] == "task":
                pools, source = load_split_pools(job["task"])
                result = {"rows": {role: len(pool) for role, pool in pools.items()}, "source": source,
                          "columns": sorted(pools["train"].column_names)}
            else:
                model, tokenizer = load_model(job["spec"], torch.device("cpu"), torch.float32)
                ids = tokenizer("The harbour was quiet.", return_tensors="pt")["input_ids"]
                logits = model(input_ids=ids).logits
                result = {"model_type": model.config.model_type, "tokens": ids.shape[1],
                          "vocab": logits.shape[-1], "tokenizer": type(tokenizer).__name__}
            print(json.dumps({"name": job["name"], "ok": True, **result}), flush=True)
        except ZobenchError as error:
            print(json.dumps({"name": job["name"], "ok": False, "error": str(error)}), flush=True)
    print(json.dumps({"name": "unserved", "requests": hub.unserved}))
"""


def probe(jobs: list[dict], root: Path) -> dict[str, dict]:
    request = {"tests": str(Path(__file__).parent), "root": str(root), "samples": str(tasks_dir() / "samples"),
               "datasets": DATASETS, "opt": OPT_REPOS, "llama": LLAMA_REPOS, "jobs": jobs}
    result = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(request), capture_output=True,
                            text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {line["name"]: line for line in lines}


def task_job(name: str) -> dict:
    from zobench.tasks import load_task_definition

    return {"kind": "task", "name": name, "task": load_task_definition(name)}


def model_presets() -> dict[str, dict]:
    """Every preset that loads pretrained weights (the tiny ones build random weights offline)."""
    presets = {path.stem: yaml.safe_load(path.read_text()) for path in sorted((conf_dir() / "model").glob("*.yaml"))}
    return {name: spec for name, spec in presets.items() if spec.get("init", "pretrained") == "pretrained"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One subprocess loads everything: every task and preset, and the deliberately wrong names."""
    jobs = [task_job(name) for name in task_names()]
    rte = task_job("rte")["task"]
    jobs.append({"kind": "task", "name": "wrong config", "task": {**rte, "hub": {**rte["hub"], "name": "rte2"}}})
    jobs.append({"kind": "task", "name": "wrong split",
                 "task": {**rte, "splits": {"train": "train", "test": "valid"}}})
    jobs.append({"kind": "task", "name": "wrong repo", "task": {**rte, "hub": {"path": "aps/super-glue", "name": "rte"}}})
    jobs += [{"kind": "model", "name": name, "spec": spec} for name, spec in model_presets().items()]
    opt = model_presets()["opt-13b"]
    jobs.append({"kind": "model", "name": "wrong model id", "spec": {**opt, "hub_id": "facebook/opt-13B-typo"}})
    found = probe(jobs, tmp_path_factory.mktemp("hub"))
    missing = [job["name"] for job in jobs if job["name"] not in found]
    assert not missing, f"no result for {missing}; the server did not serve: {found['unserved']['requests'][:10]}"
    return found


@pytest.mark.parametrize("name", task_names())
def test_every_task_loads_from_its_hub_dataset_config_and_splits(results, name):
    result = results[name]
    assert result["ok"], result.get("error")
    task = task_job(name)["task"]
    assert result["source"].startswith(f"hub dataset {task['hub']['path']}")
    assert set(task["columns"]) <= set(result["columns"])
    assert all(count > 0 for count in result["rows"].values())


@pytest.mark.parametrize("name", sorted(model_presets()))
def test_every_model_preset_loads_its_hub_weights_and_tokenizer(results, name):
    result = results[name]
    assert result["ok"], result.get("error")
    assert result["model_type"] == model_presets()[name]["arch"]["model_type"]
    assert result["tokens"] > 1 and result["vocab"] > 1


@pytest.mark.parametrize("name, says", [("wrong config", "BuilderConfig 'rte2' not found"), ("wrong split", "split 'valid'"),
                                        ("wrong repo", "aps/super-glue"), ("wrong model id", "facebook/opt-13B-typo")])
def test_a_wrong_repository_config_or_split_fails_with_one_clear_line(results, name, says):
    result = results[name]
    assert not result["ok"] and says in result["error"], result
