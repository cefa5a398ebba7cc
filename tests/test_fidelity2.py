"""Issue 22, fidelity second pass: each test holds zobench to its reference code (MeZO large_models/)."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import QUICK, run_cli
from zobench.spec import RunSpec
from zobench.configs import compose
from zobench.data import sample_splits
from zobench.encoding import EncodedExample, Encoder, collate
from zobench.optim.linear_probe import LinearProbe, ProbeEvaluator
from zobench.models import load_model
from zobench.objective import Objective
from zobench.optim.hf_adamw import HFAdamW
from zobench.tasks import PromptTemplate, load_task_definition

COPA_ROWS = [{"premise": p, "choice1": a, "choice2": b, "question": q, "idx": i, "label": l}
             for i, (p, a, b, q, l) in enumerate([
                 ("The kettle whistled. ", "The water boiled over the rim of the pot.", "I was asleep.", "cause", 0),
                 ("The man lost his keys. ", "He searched the whole house twice.", "He sang.", "effect", 0),
                 ("The road was icy. ", "The car slid.", "The sun was shining brightly all afternoon.", "effect", 0),
                 ("She opened the window. ", "The room was stuffy and far too warm.", "It rained.", "cause", 0),
                 ("The dog barked. ", "A stranger knocked at the door.", "The cat slept on the warm rug.", "cause", 0),
                 ("The cake burned. ", "I forgot the oven.", "The guests praised the baker loudly.", "cause", 0)])]


# -- 1. the 16-bit loss is MeZO's --------------------------------------------------------------------------

@functools.cache
def _copa_model_and_batches(dtype):
    cfg = compose(QUICK)
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"), dtype)
    encoder, template = Encoder(tokenizer, 256), PromptTemplate(load_task_definition("copa"))
    encoded = [encoder.encode(template.render(row)) for row in COPA_ROWS]
    batches = {mode: collate(encoded, tokenizer.pad_token_id, classification=mode) for mode in (True, False)}
    return model, tokenizer.pad_token_id, batches


def _mezo_loss(model, batch, pad_id, num_options):
    """MeZO large_models/utils.py forward_wrap_with_option_len, transcribed op by op (labels = input_ids)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = torch.clone(batch.input_ids)[..., 1:].contiguous()
    shift_labels[shift_labels == pad_id] = -100
    option_len = batch.option_mask.sum(dim=1).tolist()
    lengths = batch.attention_mask.sum(dim=1).tolist()
    # MeZO left-pads (run.py: padding_side = "left"), so `shift_labels[_i, :-_len] = -100` counts from the
    # row's end; zobench right-pads, so the same rule counts from each row's last real token
    for _i, _len in enumerate(option_len):
        shift_labels[_i, :lengths[_i] - 1 - _len] = -100
    loss_fct = torch.nn.CrossEntropyLoss(ignore_index=-100)
    if num_options is not None:
        log_probs = F.log_softmax(shift_logits, dim=-1)
        mask = shift_labels != -100
        shift_labels[~mask] = 0
        selected_log_probs = torch.gather(log_probs, dim=-1, index=shift_labels.unsqueeze(-1)).squeeze(-1)
        selected_log_probs = (selected_log_probs * mask).sum(-1) / mask.sum(-1)
        if isinstance(num_options, list):  # options of different counts: one loss per example, then / count
            loss, start_id, count = 0, 0, 0
            while start_id < len(num_options):
                end_id = start_id + num_options[start_id]
                _logits = selected_log_probs[start_id:end_id].unsqueeze(0)
                loss = loss_fct(_logits, batch.gold[count].unsqueeze(0)) + loss
                count += 1
                start_id = end_id
            return loss / count
        selected_log_probs = selected_log_probs.view(-1, num_options)
        return loss_fct(selected_log_probs, batch.gold)
    return loss_fct(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1))


@pytest.mark.parametrize("classification", [True, False], ids=["classification", "lm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_loss_is_mezos_bit_for_bit(dtype, classification):
    """Options of several tokens: MeZO sums the log-probs in fp32 and rounds once (classification) and takes
    CrossEntropyLoss's mean (LM); zobench's loss in the weights' dtype is the same number, bit for bit."""
    model, pad_id, batches = _copa_model_and_batches(dtype)
    batch = batches[classification]
    assert int(batch.option_mask.sum(dim=1).min()) >= 3  # several tokens per option
    with torch.no_grad():
        ours = Objective(model, loss_dtype=dtype).loss(batch)
        theirs = _mezo_loss(model, batch, pad_id, 2 if classification else None)
    assert ours.dtype == theirs.dtype == dtype
    assert ours.item() == theirs.item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_loss_over_different_candidate_counts_is_mezos(dtype):
    """MeZO's loop for examples with different numbers of options: a CrossEntropyLoss per example, added up in
    the loss dtype, divided by their count (not one mean over a padded table)."""
    model, pad_id, _ = _copa_model_and_batches(dtype)
    counts = [2, 3, 2, 4, 3, 2]
    examples = [EncodedExample([[0, 30 + i, 40 + c, 50 + c, 60 + c + i] for c in range(n)], [2 + c % 2 for c in range(n)],
                               [i % n], [0, 30 + i], False) for i, n in enumerate(counts)]
    batch = collate(examples, pad_id, classification=True)
    with torch.no_grad():
        ours = Objective(model, loss_dtype=dtype).loss(batch)
        theirs = _mezo_loss(model, batch, pad_id, [n for n in counts for _ in range(n)])
    assert ours.dtype == theirs.dtype == dtype and ours.item() == theirs.item()


# -- 2. head-tuning in 16-bit: finetune.sh's fp32 model under autocast, HF's AdamW, clipping at 1.0 ---------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head_tuning_runs_in_16_bit(tmp_path, dtype):
    result = run_cli("experiment=quickstart", "optimizer=head_tuning", f"dtype={dtype}", "train.steps=3",
                     "train.eval_interval=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 3 and metrics["backward_passes"] == 3
    assert math.isfinite(metrics["dev_loss"])


def test_head_tuning_follows_hf_trainer(quick_cfg):
    """finetune.sh's HF Trainer (transformers 4.28): AdamW `adamw_hf`, max_grad_norm 1.0."""
    from test_mezo import _setup
    _, _, optimizer, _ = _setup(quick_cfg("optimizer=head_tuning"))
    assert isinstance(optimizer.optimizer, HFAdamW) and optimizer.clip == 1.0


def test_hf_adamw_first_step_is_transformers_rule():
    """transformers.AdamW: eps added to sqrt(v) before the bias correction, so step 1 is
    lr·sqrt(1-β2)/(1-β1) · (1-β1)g / (sqrt((1-β2)g²) + eps), not torch's lr·g/(|g| + eps)."""
    grad = torch.tensor([1e-6, 1e-3, -2.0], dtype=torch.float64)
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    param.grad = grad.clone()
    lr, (b1, b2), eps = 0.1, (0.9, 0.999), 1e-6
    HFAdamW([param], lr=lr, betas=(b1, b2), eps=eps).step()
    expected = -lr * math.sqrt(1 - b2) / (1 - b1) * (1 - b1) * grad / (((1 - b2) * grad ** 2).sqrt() + eps)
    assert torch.allclose(param.detach(), expected, rtol=1e-12, atol=0)


# -- 3. train.keep_best=none reports the dev figures of the weights it tests ----------------------------------

def test_keep_best_none_reports_the_final_weights(tmp_path):
    """The loss climbs after step 2 (lr 0.3), so the best evaluation is not the last; keep_best=none tests the
    step-4 weights, and metrics.json, the console and the report's dev column must describe those."""
    run_dir = tmp_path / "run"
    result = run_cli("experiment=quickstart", "train.keep_best=none", "train.steps=4", "train.eval_interval=2",
                     "optimizer.lr=0.3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    dev = {e["step"]: e for e in events if e.get("event") == "eval" and e.get("split") == "dev"}
    assert dev[2]["loss"] < dev[4]["loss"]  # a keep-the-best run would have chosen step 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["best_step"], metrics["dev_metric"], metrics["dev_loss"]) == (4, dev[4]["metric"], dev[4]["loss"])
    assert f"(dev accuracy = {dev[4]['metric']:.4f}, best step 4)" in result.stdout + result.stderr


# -- 4. mezo_opt13b_ft trains MeZO's 5 epochs of each task's training set ---------------------------------------

@pytest.mark.parametrize("task, train_rows, steps", [("cb", 250, 95), ("copa", 400, 190), ("wsc", 554, 35),
                                                     ("sst2", 67349, 625)])
def test_ft_preset_resolves_5_epochs_per_task(task, train_rows, steps):
    """finetune.sh: 5 epochs at batch 8, evaluated once per epoch; CB and COPA keep 100 for dev (150 / 300
    train), WSC 500 (54 train), the rest 1000 train: 5 * ceil(n_train / 8) steps."""
    cfg = compose(["experiment=mezo_opt13b_ft", f"task={task}"])
    definition = OmegaConf.to_container(cfg.task, resolve=True)
    sizes = {key: min(int(cfg.data[key]), int(definition["sizes"].get(key, 10**12)))
             for key in ("n_train", "n_dev", "n_test")}  # as data.sample_task caps them
    splits = sample_splits({"train": [{"i": i} for i in range(train_rows)], "test": [{"i": 0}]}, seed=0,
                           source="synthetic", **sizes)
    train = RunSpec.from_cfg(cfg).train.for_training_size(len(splits.train))
    assert (train.steps, train.eval_interval) == (steps, steps // 5)
    assert cfg.optimizer.torch_class == "HFAdamW"  # HF Trainer's adamw_hf, as finetune.sh ran


def test_epochs_set_the_steps_a_run_takes(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("experiment=quickstart", "train.epochs=2", "train.batch_size=5", "train.steps=1000",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_train"] == 16 and metrics["steps"] == metrics["steps_planned"] == 8  # 2 x ceil(16 / 5)
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "eval" and e.get("split") == "dev"] == [4, 8]


# -- 5. linear probing's CV folds follow the shuffled training order -----------------------------------------

def test_probe_fits_the_rows_in_the_shuffled_training_order(monkeypatch):
    """MeZO extracts the probe's rows from HF's shuffled train dataloader, and LogisticRegressionCV's folds
    follow row order: the rows reach the fit in the run seed's first-epoch order, not in sample order."""
    train = [EncodedExample([[0, i]], [1], [i % 3], [i], False) for i in range(30)]
    probe = LinearProbe(None, None, LinearProbe.Settings(cv=5, max_iter=5000, tol=1e-4, fit_intercept=False), seed=7,
                        total_steps=0)
    evaluator = ProbeEvaluator(probe, objective=None, pad_id=1, batch_size=8)
    monkeypatch.setattr(evaluator, "features", lambda examples: np.array([[float(e.prompt_ids[0])] for e in examples]))
    seen = {}
    monkeypatch.setattr(probe, "fit", lambda features, labels: seen.update(rows=features[:, 0].astype(int).tolist(),
                                                                           labels=labels.tolist()))
    evaluator.fit(train)
    first_epoch = np.random.RandomState(7).permutation(30).tolist()  # Optimizer.batches' first epoch
    assert seen["rows"] == first_epoch != list(range(30))
    assert seen["labels"] == [i % 3 for i in first_epoch]


# -- 6. the rest of issue 22's list -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_ip_sgd_weights_arithmetic_keeps_lr_in_fp32(dtype):
    """update_dtype=weights: θ − lr·g rounded once into 16 bits with lr as given (CUDA's opmath); CPU's
    `add_(alpha=-lr)` rounded lr itself to 16 bits (1e-7 -> 1.19e-7 in fp16) and so moved weights it should not."""
    from zobench.optim.ip_sgd import _sgd_update

    theta = torch.full((64,), 1.0, dtype=dtype) * torch.linspace(1e-4, 2e-4, 64).to(dtype)
    grad = torch.linspace(0.3, 0.7, 64).to(dtype)
    lr = 1e-7 if dtype == torch.float16 else 3e-4 / 7
    expected = (theta.float() - lr * grad.float()).to(dtype)
    updated = theta.clone()
    _sgd_update(updated, grad.clone(), lr, 0.0, 1.0)
    assert torch.equal(updated, expected)


def test_speed_table_has_no_ratio_when_mezo_reaches_the_target_at_step_0(tmp_path):
    """A target the baseline meets before training (step 0, 0 passes) gives no ratio: a dash, not 0.00x."""
    from test_report_speed import speed, write_run

    runs = tmp_path / "runs"
    write_run(runs, "mezo", [(0, 0.70, 0, 0.0), (1000, 0.65, 2000, 100.0)])
    write_run(runs, "addax", [(100, 0.72, 150, 10.0), (200, 0.75, 300, 20.0)])
    rows, markdown, _ = speed(tmp_path, runs, "--speed-target", "70")
    assert rows["passes_speedup"].isna().all() and rows["seconds_speedup"].isna().all()
    assert "0.00x" not in markdown


def test_zobench_sst2_presets_sweep_each_methods_own_grid():
    """ZO-Bench's SST-2 / OPT-1.3B sweeps (zo-bench/sweeps/SST2_opt-1.3b/*_cls_ft*.yml): 48 jobs, not 60."""
    from test_report_presets import compose_with_hydra

    grids = {}
    for suffix in ("", "_momentum", "_sign"):
        cfg = compose_with_hydra([f"experiment=zobench_sst2_opt1.3b{suffix}"])
        params = cfg.hydra.sweeper.params
        assert cfg.dtype == "float32" and cfg.seed == 42 and cfg.train.eval_interval == 500
        for optimizer in params.optimizer.split(","):
            grids[optimizer] = (params["optimizer.lr"].split(","), params["optimizer.eps"].split(","))
    every = ["1e-4", "1e-5", "1e-6", "1e-7", "1e-8"]
    assert grids == {"mezo": (every, ["1e-3", "1e-4", "1e-5"]), "zo_adam": (every, ["1e-3", "1e-4", "1e-5"]),
                     "zo_sgd_momentum": (every[1:], ["1e-3", "1e-4", "1e-5"]),
                     "zo_sgd_sign": (["1e-4", "1e-6", "1e-8"], ["1e-3", "1e-5"])}


def test_zobench_copa_fp16_presets_sweep_each_methods_own_grid():
    """zo-bench/sweeps/Copa_opt-13b: zo_sgd lr 1e-4..1e-8, zo_sgd_momen 1e-5..1e-8, both eps 1e-2..1e-4."""
    from test_report_presets import compose_with_hydra

    grids = {}
    for suffix in ("", "_momentum"):
        cfg = compose_with_hydra([f"experiment=zobench_copa_opt13b_fp16{suffix}"])
        params = cfg.hydra.sweeper.params
        assert cfg.dtype == "float16" and cfg.task.name == "copa" and cfg.data.n_train == 300
        grids[params.optimizer] = (params["optimizer.lr"].split(","), params["optimizer.eps"].split(","))
    every, eps = ["1e-4", "1e-5", "1e-6", "1e-7", "1e-8"], ["1e-2", "1e-3", "1e-4"]
    assert grids == {"mezo": (every, eps), "zo_sgd_momentum": (every[1:], eps)}


def _zo_bench_step(name, theta, g, z, lr):
    """ZO-Bench's zo_step for q = 1 (zo-bench/trainer.py ~1040-1075) from a restored θ, the first step: ĝ = g·z in
    the weights' dtype as param.grad, then torch's SGD(momentum 0.9) / Adam (foreach, as on CUDA: every
    operation computed in fp32 and rounded into the 16-bit tensor). Adam's ε stays fp32 (zobench's one change)."""
    r = lambda t: t.to(theta.dtype).float()  # noqa: E731
    grad = r(g * z.float())
    if name == "zo_sgd_momentum":
        direction, scale = r(r(0.9 * torch.zeros_like(grad)) + grad), lr  # buf.mul_(0.9).add_(grad)
    else:
        exp_avg = r(torch.zeros_like(grad).lerp_(grad, 0.1))
        exp_avg_sq = r(r(torch.zeros_like(grad) * 0.999).addcmul_(grad, grad, value=0.001))
        denominator = r(r(exp_avg_sq.sqrt()) / math.sqrt(1 - 0.999)) + 1e-8
        direction, scale = exp_avg / denominator, lr / (1 - 0.9)
    return theta.float().add_(direction, alpha=-scale).to(theta.dtype)  # param.add_ / addcdiv_: one rounding


@pytest.mark.parametrize("name", ["zo_sgd_momentum", "zo_adam"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_stateful_zo_rounds_as_zo_bench(quick_cfg, dtype, name):
    """Reference mode with 16-bit state: ĝ rounded to the weights' dtype, each state operation rounded, and θ
    moved by one rounding (torch's optimizer.step()), not MeZO's three (r(g·z), r(lr·…), r(θ − …))."""
    from test_precision_zo import _opt_tiny

    lr = 1e-3 if name == "zo_sgd_momentum" else 1e-4
    restored_model, probe, batch = _opt_tiny(quick_cfg, dtype, name, "reference", state="weights", lr=0.0, eps=1e-2)
    model, optimizer, _ = _opt_tiny(quick_cfg, dtype, name, "reference", state="weights", lr=lr, eps=1e-2)
    probe.step(batch)  # lr 0: only the restore, θ as ZO-Bench holds it before optimizer.step()
    optimizer.step(batch)
    assert optimizer.last_projected_grads == probe.last_projected_grads
    (seed, g), = optimizer.last_projected_grads
    restored = dict(restored_model.named_parameters())
    moved = dict(model.named_parameters())
    for index, (param_name, _) in enumerate(optimizer.engine.named):
        theta = restored[param_name].detach()
        z = optimizer.engine.direction(seed, index, theta)
        assert torch.equal(moved[param_name].detach(), _zo_bench_step(name, theta, g, z, lr)), param_name


def test_sparse_mezo_presets_evaluate_often_enough_for_the_papers_claim():
    """Sparse MeZO: 70% on RTE at 5,000 steps vs MeZO's 17,500; evaluations every 4,000 steps cannot tell."""
    for name in ("sparse_mezo_opt13b", "sparse_mezo_llama7b", "sparse_mezo_llama30b"):
        cfg = compose([f"experiment={name}"])
        interval = cfg.train.early_stop.interval
        assert cfg.train.early_stop.patience is None and 5000 % interval == 0 and 17500 % interval == 0, name
        assert cfg.train.eval_interval == 4000  # the selection stays MeZO's


def test_extra_dev_evaluations_without_patience_choose_nothing_and_never_stop(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("experiment=quickstart", "train.steps=4", "train.eval_interval=4", "train.early_stop.interval=2",
                     "optimizer.lr=0.3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "eval" and e.get("split") == "dev"] == [0, 2, 4]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["best_step"] == 4 and metrics.get("stopped_early_at") is None
