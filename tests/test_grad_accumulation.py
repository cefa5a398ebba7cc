"""train.grad_accumulation in one process: a step's batch taken in micro-batches gives the step of the whole
batch (first-order torch optimizers); the methods that cannot accumulate are refused in one line; the
trajectory records the whole batch's loss once per step.

The 2-rank counterparts (one process with grad_accumulation=N takes N ranks' micro-batches) are in
tests/test_distributed_fo_fp16.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zobench.errors import ZobenchError
from zobench.parallel.first_order import RankShare
from zobench.parallel.world import World


def train(out: Path, steps: int, *words: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """tests/distributed_fo_worker.py's steps in this process: (losses, final weights)."""
    from distributed_fo_worker import main

    main(out, steps, list(words))
    return json.loads((out / "losses.json").read_text()), load_file(str(out / "weights.safetensors"))


def test_two_micro_batches_take_the_whole_batchs_adam_step(tmp_path):
    """fp32 Adam at MeZO's FT lr, 3 steps over 11 examples in batches of 4, 4 and 3 (the last short batch split
    1 + 2, each part weighted by its share of the batch): grad_accumulation=2 lands where 1 does, losses and
    weights within 1e-6 (measured: 8.9e-8 and 4.8e-8, the most in k_proj.bias, whose exact gradient is 0: Adam
    steps on its rounding noise, about lr x noise / eps)."""
    words = ["data.n_train=11", "optimizer.lr=1e-5"]
    losses_1, weights_1 = train(tmp_path / "one", 3, *words)
    losses_2, weights_2 = train(tmp_path / "two", 3, *words, "train.grad_accumulation=2")
    initial = load_file(str(tmp_path / "one" / "initial.safetensors"))
    assert max(abs(a - b) for a, b in zip(losses_1, losses_2)) <= 1e-6, (losses_1, losses_2)
    assert max(float((weights_1[n] - weights_2[n]).abs().max()) for n in weights_1) <= 1e-6
    assert max(float((weights_1[n] - initial[n]).abs().max()) for n in initial) > 2e-5  # Adam: ~lr a step


def test_micro_batches_are_contiguous_even_parts_of_each_ranks_share():
    assert RankShare(World(), 2).split([7, 3, 5, 1, 2]) == ([7, 3], [5, 1, 2])
    assert RankShare(World(), 3).split([4]) == ([4],)  # one process: a short batch's empty parts left out
    assert RankShare(World(1, 2, 1), 2).split(list(range(7))) == ([3, 4], [5, 6])  # rank 1: 4 of 7, in 2
    with pytest.raises(ZobenchError, match=r"train.grad_accumulation.*at least 4"):
        RankShare(World(0, 2, 0), 2).split([0, 1, 2])  # ranks each need a part: every part runs collectives


@pytest.mark.parametrize("optimizer, says", [
    ("mezo", "is zeroth-order: there is no gradient to accumulate"),
    ("zo_adam", "is zeroth-order"),
    ("ip_sgd", "updates each parameter in place during backward"),
    ("addax", "updates each parameter in place during backward"),
    ("zero_shot", "takes no training step"),
])
def test_methods_that_cannot_accumulate_are_refused_in_one_line(quick_cfg, optimizer, says):
    from zobench.spec import RunSpec

    with pytest.raises(ZobenchError, match=f"train.grad_accumulation=2: optimizer={optimizer} {says}") as refused:
        RunSpec.from_cfg(quick_cfg(f"optimizer={optimizer}", "train.grad_accumulation=2"))
    assert "\n" not in str(refused.value) and "set train.grad_accumulation=1" in str(refused.value)


def test_bad_accumulation_counts_are_refused_and_old_configs_read_as_one(quick_cfg):
    from omegaconf import OmegaConf

    from zobench.spec import RunSpec

    with pytest.raises(ZobenchError, match="train.grad_accumulation must be >= 1"):
        RunSpec.from_cfg(quick_cfg("optimizer=adam", "train.grad_accumulation=0"))
    with pytest.raises(ZobenchError, match="train.grad_accumulation=5 splits each batch of train.batch_size=4"):
        RunSpec.from_cfg(quick_cfg("optimizer=adam", "train.grad_accumulation=5"))
    assert RunSpec.from_cfg(quick_cfg("optimizer=sgd", "train.grad_accumulation=4")).train.grad_accumulation == 4
    older = quick_cfg("optimizer=adam")  # a run folder's config.yaml from before the key
    OmegaConf.set_struct(older, False)
    del older.train["grad_accumulation"]
    assert RunSpec.from_received(older).train.grad_accumulation == 1


@pytest.mark.parametrize("parts", [2, 3])
def test_the_trajectory_records_the_whole_batchs_loss_once_per_step(quick_cfg, tmp_path, parts):
    """A run with grad_accumulation=2 or 3: each trajectory line holds one loss, the whole batch's mean that
    log.jsonl has too (not the micro-batches' means); a forward and backward pass per part each step."""
    from zobench.run import run

    cfg = quick_cfg("optimizer=adam", "optimizer.lr=1e-4", "train.steps=3", "train.eval_interval=0",
                    "data.n_dev=2", "data.n_test=2", f"train.grad_accumulation={parts}")
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["backward_passes"] == 3 * parts, metrics["error"]
    trajectory = [json.loads(line)["losses"] for line in (tmp_path / "trajectory.jsonl").read_text().splitlines()]
    logged = [line["loss"] for line in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())
              if line["event"] == "train"]
    assert trajectory == [[loss] for loss in logged] and len(logged) == 3


def test_clipping_measures_the_norm_as_torch_and_clips_to_the_bound():
    """optim/first_order.clip_gradients: torch's clip_grad_norm_ rule (its norm summed in float64)."""
    from zobench.optim.first_order import clip_gradients

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 1000, 7)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    expected = float(torch.nn.utils.clip_grad_norm_(copies, 1.0))
    assert clip_gradients(params, 1.0) == pytest.approx(expected, rel=1e-6)
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)
    assert all(torch.allclose(p.grad, c.grad, rtol=1e-6, atol=0) for p, c in zip(params, copies))
    assert clip_gradients(params, None) == pytest.approx(1.0, rel=1e-5)  # measured only, left as they are


def test_the_memory_plan_holds_one_micro_batchs_activations():
    """zobench-plan: MeZO's FT preset on 4 GPUs (2 examples per rank) with grad_accumulation=2 plans the
    activations of 1 example's backward, half of them."""
    from zobench.memory_plan import parse_size, plan
    from zobench.plan import job_shape

    def activations(parts: int) -> int:
        shape = job_shape(["experiment=mezo_opt13b_ft", "task=sst2", "device=cuda", "dtype=float16",
                           f"train.grad_accumulation={parts}"], {})
        return plan(shape, parse_size("80GB"), gpus=4).per_gpu["activations"]

    assert activations(2) * 2 == activations(1)


def test_a_batch_too_small_for_the_ranks_micro_batches_is_refused_before_anything_loads(quick_cfg):
    """Under torchrun each rank takes train.grad_accumulation micro-batches of its share: a batch of 4 over 2
    ranks x 3 is refused in one line when the run is planned, not after the model has loaded."""
    from zobench.parallel.ranks import Ranks
    from zobench.spec import RunSpec

    spec = RunSpec.from_cfg(quick_cfg("optimizer=adam", "train.grad_accumulation=3", "train.keep_best=host"))
    with pytest.raises(ZobenchError, match=r"train.batch_size=4 cannot be split over 2 ranks x "
                                           r"train.grad_accumulation=3 micro-batches: make it at least 6"):
        Ranks(spec, World(0, 2, 0))
    Ranks(spec, World())  # one process: 3 micro-batches of a batch of 4
    Ranks(RunSpec.from_cfg(quick_cfg("optimizer=adam", "train.grad_accumulation=2", "train.keep_best=host")),
          World(0, 2, 0))
