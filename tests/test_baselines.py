"""MeZO's baseline rows: zero-shot, in-context learning (ICL) and linear probing (LP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from zobench.encoding import Encoder
from zobench.errors import ZobenchError
from zobench.icl import demonstration, demonstration_blocks
from zobench.optim.linear_probe import LinearProbe
from zobench.models import load_model
from zobench.replay import replay_run
from zobench.run import run
from zobench.tasks import Example


def _weights_unchanged(cfg, run_dir) -> bool:
    """The run's saved (tested) weights are the preset's weights as loaded."""
    model, _ = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"), torch.float32)
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    loaded = model.state_dict()
    return all(torch.equal(tensor, loaded[name]) for name, tensor in saved.items())


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("icl_k", [0, 4])
def test_zero_shot_and_icl_evaluate_the_model_as_loaded(quick_cfg, tmp_path, icl_k):
    cfg = quick_cfg("optimizer=zero_shot", f"icl.k={icl_k}", "save_model=true", "max_length=1024")
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["error"] is None
    assert metrics["metric"] == "accuracy" and 0 <= metrics["test_metric"] <= 1 and metrics["dev_metric"] is not None
    assert metrics["icl_k"] == icl_k and metrics["steps"] == 0 and metrics["steps_planned"] == 0
    # No training: no training passes; evaluation's are counted (dev 8 + test 12 examples, batches of 8).
    assert (metrics["forward_passes"], metrics["backward_passes"], metrics["tokens"]) == (0, 0, 0)
    assert metrics["eval_forward_passes"] == 1 + 2 and metrics["n_trainable_params"] == 0
    assert metrics["wall_clock_s"] > 0 and metrics["peak_memory_bytes"] > 0
    assert [(line["event"], line.get("split")) for line in _lines(tmp_path)] == [("eval", "dev"), ("eval", "test")]
    assert _weights_unchanged(cfg, tmp_path)
    assert not (tmp_path / "best_weights.safetensors").exists()
    with pytest.raises(ZobenchError, match="trains nothing"):
        replay_run(tmp_path)


def test_icl_prompts_follow_mezo():
    pool = [Example("Great film. It was", [" terrible", " great"], [1]),
            Example("Dull plot. It was", [" terrible", " great"], [0]),
            Example("Q: 2+2?\nA:", [" 4\n"], ["4"])]  # generation: the target candidate
    assert [demonstration(e) for e in pool] == ["Great film. It was great", "Dull plot. It was terrible",
                                                "Q: 2+2?\nA: 4"]
    blocks = demonstration_blocks(pool, count=5, k=2, seed=0)
    seeds = np.random.RandomState(0).randint(0, 10000, 5)  # MeZO: one demonstration set per evaluated example
    for block, seed in zip(blocks, seeds):
        chosen = np.random.RandomState(int(seed)).permutation(3)[:2]
        assert block == "\n\n".join(demonstration(pool[i]) for i in chosen)
    assert demonstration_blocks(pool, count=3, k=2, seed=0) == blocks[:3]  # test's draws do not depend on dev's


def test_icl_encoding_keeps_the_option_and_truncates_from_the_left():
    from zobench.byte_tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    example = Example("Dull plot. It was", [" terrible", " great"], [0])
    plain = Encoder(tokenizer, 256).encode(example)
    with_demos = Encoder(tokenizer, 256).encode(example, demonstrations="A. It was great\n\nB. It was terrible")
    assert with_demos.option_lens == plain.option_lens
    text = tokenizer.decode(with_demos.sequences[1], skip_special_tokens=True)
    assert text == "A. It was great\n\nB. It was terrible\n\nDull plot. It was great"
    assert tokenizer.decode(with_demos.prompt_ids, skip_special_tokens=True).endswith("terrible\n\nDull plot. It was")
    short = Encoder(tokenizer, 30).encode(example, demonstrations="x" * 100)  # demonstrations lose their head
    assert short.truncated and all(len(s) == 30 and s[0] == tokenizer.bos_token_id for s in short.sequences)
    assert short.sequences[1][-short.option_lens[1]:] == plain.sequences[1][-plain.option_lens[1]:]


def test_probe_separates_separable_features():
    rng = np.random.RandomState(0)
    labels = np.repeat([0, 1, 2], 12)
    features = 5 * np.eye(8)[labels] + 0.3 * rng.randn(36, 8)  # one direction per class, through the origin
    probe = LinearProbe(None, None, LinearProbe.Settings(cv=5, max_iter=5000, tol=1e-4, fit_intercept=False),
                        seed=0, total_steps=0)
    result = probe.fit(features, labels).score(features, [[int(c)] for c in labels])
    assert result["accuracy"] == 1.0 and result["predictions"] == labels.tolist() and np.isfinite(result["loss"])
    with pytest.raises(ZobenchError, match="at least two classes"):
        probe.fit(features[:12], labels[:12])


def test_linear_probing_runs_on_the_tiny_model(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=lp", "save_model=true"), tmp_path)
    assert metrics["status"] == "completed" and metrics["metric"] == "accuracy"
    assert 0 <= metrics["test_metric"] <= 1 and 0 <= metrics["dev_metric"] <= 1
    # The training cost is the feature passes over the 16 training prompts (batches of 8).
    assert (metrics["forward_passes"], metrics["backward_passes"], metrics["steps"]) == (2, 0, 0)
    assert metrics["train_wall_clock_s"] > 0 and metrics["eval_forward_passes"] == 3
    assert _weights_unchanged(quick_cfg("optimizer=lp"), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer=lp", "task=squad"], "classification tasks only"),
    (["optimizer=lp", "task=copa"], "classification tasks only"),
    (["optimizer=mezo", "icl.k=4"], "icl.k=4 is for optimizer=zero_shot"),
    (["optimizer=zero_shot", "icl.k=-1"], "icl.k must be >= 0"),
])
def test_methods_refuse_what_they_cannot_do(quick_cfg, tmp_path, overrides, message):
    with pytest.raises(ZobenchError, match=message):
        run(quick_cfg(*overrides), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and message in metrics["error"]
