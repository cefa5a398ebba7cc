"""PEFT (peft=lora / peft=prefix) under any optimizer: only the adapter trains; resume and replay rebuild it."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import fail_once_at
from zobench.data import load_split_pools, sample_splits
from zobench.encoding import Encoder, collate
from zobench.errors import ZobenchError
from zobench.models import load_model
from zobench.objective import Objective
from zobench.optim import build_optimizer
from zobench.peft_adapters import apply_peft, generate, init_prefix_from_tokens
from zobench.run import run
from zobench.tasks import PromptTemplate

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="the peft extra is not installed: pip install 'zobench[peft]'")


def _model(cfg):
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"), torch.float32)
    trained, saveable = apply_peft(model, OmegaConf.to_container(cfg.peft, resolve=True), seed=int(cfg.seed))
    return trained, saveable, tokenizer


def _batch(cfg, tokenizer):
    task = OmegaConf.to_container(cfg.task, resolve=True)
    pools, source = load_split_pools(task)
    rows = sample_splits(pools, n_train=8, n_dev=0, n_test=0, seed=0, source=source).train
    encoder, template = Encoder(tokenizer, 256), PromptTemplate(task)
    return collate([encoder.encode(template.render(row)) for row in rows], tokenizer.pad_token_id, True)


@needs_peft
@pytest.mark.parametrize("method, adapter_names", [("lora", ("lora_A", "lora_B")), ("prefix", ("prompt_encoder",))])
def test_mezo_trains_the_adapter_alone(quick_cfg, method, adapter_names):
    cfg = quick_cfg("optimizer=mezo", f"peft={method}", "optimizer.lr=1e-2", "optimizer.eps=1e-2")
    model, _, tokenizer = _model(cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(a in name for a in adapter_names) for name in trainable)
    optimizer = build_optimizer(cfg.optimizer, model, Objective(model), seed=0, total_steps=3)
    batch = _batch(cfg, tokenizer)
    for _ in range(3):
        optimizer.step(batch)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], before[name]) for name in before if name not in trainable)  # bit for bit
    assert any(not torch.equal(after[name], before[name]) for name in trainable)


@needs_peft
def test_sparse_mezo_keeps_training_lora_b_after_its_first_update(quick_cfg):
    # B starts at zero: a magnitude mask |B| <= 0 would freeze all of it once it has moved.
    cfg = quick_cfg("optimizer=sparse_mezo", "peft=lora", "optimizer.lr=1e-2", "optimizer.eps=1e-2")
    model, _, tokenizer = _model(cfg)
    optimizer = build_optimizer(cfg.optimizer, model, Objective(model), seed=0, total_steps=3)
    batch = _batch(cfg, tokenizer)
    masked = {optimizer.engine.named[i][0] for i in optimizer.thresholds}
    assert masked and all("lora_A" in name for name in masked)  # A (random init) is masked, B is not
    optimizer.step(batch)
    after_one = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    optimizer.step(batch)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assert float((param != after_one[name]).float().mean()) > 0.9, name


@needs_peft
def test_lora_run_records_and_saves_the_adapter(quick_cfg, tmp_path):
    metrics = run(quick_cfg("optimizer=adam", "peft=lora", "optimizer.lr=1e-3", "train.steps=2", "save_model=true"),
                  tmp_path)
    assert metrics["status"] == "completed" and metrics["peft"] == "lora"
    assert metrics["n_trainable_params"] == 2 * 2 * 2 * 8 * 64  # 2 layers x (q, v) x (A, B) x r x hidden
    assert metrics["backward_passes"] == 2
    assert (tmp_path / "model" / "adapter_config.json").exists()
    assert not (tmp_path / "model" / "model.safetensors").exists()  # the adapter alone, not the base weights


@needs_peft
def test_lora_mezo_resume_and_replay_rebuild_the_adapter(quick_cfg, tmp_path, monkeypatch):
    from zobench.replay import replay_run

    cfg = quick_cfg("optimizer=mezo", "peft=lora", "optimizer.lr=1e-2", "optimizer.eps=1e-2", "train.steps=6",
                    "train.eval_interval=3", "checkpoint.every=2", "save_model=true")
    whole = run(cfg, tmp_path / "whole")
    original, calls = Objective.option_logprobs, []

    def fails_once(self, batch):
        calls.append(1)
        if len(calls) == 9:  # during step 4 (step 3's dev evaluation takes one pass)
            raise MemoryError
        return original(self, batch)

    monkeypatch.setattr(Objective, "option_logprobs", fails_once)
    with pytest.raises(ZobenchError, match="out of memory"):
        run(cfg, tmp_path / "broken")
    monkeypatch.setattr(Objective, "option_logprobs", original)
    resumed = run(cfg, tmp_path / "broken")  # its trajectory replayed on a freshly built adapter
    assert resumed["status"] == "completed" and resumed["resumed_at_step"] == 3
    for key in ("test_metric", "dev_loss", "best_step", "forward_passes"):
        assert resumed[key] == whole[key], key
    tested = load_file(str(tmp_path / "whole" / "model" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "broken" / "model" / "adapter_model.safetensors"))
    replayed = load_file(str(replay_run(tmp_path / "whole") / "adapter_model.safetensors"))
    assert tested.keys() == again.keys() == replayed.keys() and tested
    assert all(torch.equal(tested[k], again[k]) and torch.equal(tested[k], replayed[k]) for k in tested)
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["best_step"] in (3, 6)


@needs_peft
def test_lora_adam_checkpoints_hold_the_adapter_alone_and_resume_exactly(quick_cfg, tmp_path, monkeypatch):
    cfg = quick_cfg("optimizer=adam", "peft=lora", "optimizer.lr=1e-3", "train.steps=6", "train.eval_interval=3",
                    "checkpoint.every=2", "save_model=true")
    whole = run(cfg, tmp_path / "whole")
    fail_once_at(monkeypatch, steps_done=4)  # the fifth step; the checkpoint of step 4 survives
    with pytest.raises(ZobenchError, match="out of memory"):
        run(cfg, tmp_path / "broken")
    monkeypatch.undo()
    for saved in ("checkpoint/weights.safetensors", "best_weights.safetensors"):
        keys = load_file(str(tmp_path / "broken" / saved)).keys()
        assert keys and all("lora_" in key for key in keys), saved  # no base-model weights
    resumed = run(cfg, tmp_path / "broken")
    assert resumed["status"] == "completed" and resumed["resumed_at_step"] == 4
    for key in ("test_metric", "dev_loss", "best_step"):
        assert resumed[key] == whole[key], key
    tested = load_file(str(tmp_path / "whole" / "model" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "broken" / "model" / "adapter_model.safetensors"))
    assert tested.keys() == again.keys() and all(torch.equal(tested[k], again[k]) for k in tested)


@needs_peft
def test_prefix_starts_from_real_activations(quick_cfg):
    """A prefix made of tokens' keys and values acts as those tokens before the prompt (MeZO's init)."""
    import peft

    model, tokenizer = load_model(OmegaConf.to_container(quick_cfg().model, resolve=True), torch.device("cpu"),
                                  torch.float32)
    wrapped = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                 prefix_projection=False))
    tokens = torch.tensor([[40, 41, 42]])
    init_prefix_from_tokens(wrapped, tokens)
    prompt = torch.tensor([tokenizer("It was great")["input_ids"]])
    with torch.no_grad():
        as_prefix = wrapped(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits
        as_text = wrapped.get_base_model()(input_ids=torch.cat([tokens, prompt], dim=1)).logits[:, 3:]
    assert torch.allclose(as_prefix, as_text, atol=1e-5)


@needs_peft
@pytest.mark.parametrize("model_name", ["opt-tiny", "llama-tiny"])
def test_prefix_generation_continues_from_the_prefix(quick_cfg, model_name):
    cfg = quick_cfg(f"model={model_name}", "peft=prefix")
    model, _, tokenizer = _model(cfg)
    rows = [tokenizer("Answer:")["input_ids"], tokenizer("A longer question. Answer:")["input_ids"]]
    width = max(map(len, rows))
    input_ids = torch.full((2, width), tokenizer.pad_token_id)
    attention = torch.zeros((2, width), dtype=torch.long)
    for i, ids in enumerate(rows):  # left padding, as evaluation generates
        input_ids[i, width - len(ids):], attention[i, width - len(ids):] = torch.tensor(ids), 1
    with torch.no_grad():
        new = generate(model, input_ids, attention, do_sample=False, max_new_tokens=4,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        for i, ids in enumerate(rows):  # greedy decoding by hand, through the prefix model's forward
            sequence = torch.tensor([ids])
            for _ in range(4):
                logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
                sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
            assert new[i].tolist() == sequence[0, len(ids):].tolist()


def test_missing_peft_package_is_one_line(quick_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ZobenchError, match=r"peft=lora needs the peft package: pip install 'zobench\[peft\]'"):
        _model(quick_cfg("peft=lora"))
