"""ZO `data` and `directions` modes over 2 ranks (torchrun, gloo on CPU) in fp16 weights, both numerics modes
(precision.zo_update fused | reference), against the same run in one process: MeZO and ZO-Adam (stateful).

- `directions`: every rank makes all q perturbations in the one-process order and the gathered losses are the
  one-process losses, so the run is one process's bit for bit: losses, trajectory and fp16 weights.
- `data`: each rank's forward of its half batch gives the same per-candidate log-probs as the whole batch's
  forward (the last test), but the loss is reduced otherwise: one process takes cross_entropy's fp32 mean, data
  mode sums each rank's per-example losses in float64, all-reduces the sums and rounds the quotient once. The
  two differ now and then by one fp32 ulp (6e-8 at a loss of ~0.7). Until the first such step the runs are
  bit-identical; that step's g differs by the ulp over 2·eps (3e-5 at eps 1e-3), which changes the update of
  some fp16 weights by a unit in the last place, and from then on every forward sees slightly other weights.
  Measured over 5 steps at lr 1e-3 (opt-tiny, sst2, batch 4; most weights move: asserted), fused | reference:
    MeZO     losses within 2.8e-5 | 2.3e-5; weights within 9.8e-4 | 9.8e-4 (one fp16 ulp of the layer norms'
             weights near 1.0); 67 % | 55 % of the elements differ (MeZO's update lr·g·z carries the g
             difference into every element)
    ZO-Adam  losses within 6e-8; weights within 3.1e-5 (one ulp); 0.060 % | 0.072 % of the elements differ
             (Adam's update, ~lr·m/√v, hardly depends on a small change of g)
  The bounds asserted are these with a margin (DATA_BOUNDS). The replicas stay bit-identical throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_distributed_zo import both_ways, losses

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

FP16 = ["model=opt-tiny", "task.samples=true", "data.n_train=16", "data.n_dev=8", "data.n_test=12", "max_length=256",
        "train.batch_size=4", "train.log_interval=1", "eval.batch_size=8", "train.steps=5", "train.eval_interval=0",
        "save_model=true", "dtype=float16", "device=cpu", "optimizer.lr=1e-3"]  # a step moves fp16 weights
OPTIMIZERS = {"mezo": [], "zo_adam": []}
# data mode, what each optimizer keeps to (the module's note): loss and weight differences, elements differing
DATA_BOUNDS = {"mezo": (1e-4, 2e-3, 1.0), "zo_adam": (1e-6, 1e-4, 0.002)}


def both(tmp_path: Path, *words: str) -> tuple[Path, Path]:
    """(one process, 2 ranks) run folders of the same run."""
    one, two = both_ways(tmp_path, *FP16, *words)
    assert json.loads((two / "metrics.json").read_text())["replicas_identical"] is True
    return one, two


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model" / "model.safetensors"))


def moved(folder: Path) -> float:
    """The fraction of the saved weights that differ from the model as built (the run's steps landed)."""
    from zobench.build import build_model
    from zobench.configs import compose
    from zobench.spec import RunSpec

    from zobench.build import sample_splits

    spec = RunSpec.from_cfg(compose(FP16))
    torch.manual_seed(spec.seed)  # as the runner seeds, samples and builds
    sample_splits(spec)
    initial = dict(build_model(spec, max_length=spec.max_length)[0].named_parameters())
    saved = weights(folder)
    return sum(int((saved[k] != initial[k]).sum()) for k in saved) / sum(v.numel() for v in saved.values())


@pytest.mark.slow
@pytest.mark.parametrize("update", ["fused", "reference"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_directions_mode_in_fp16_is_one_process_bit_for_bit(tmp_path, optimizer, update):
    one, two = both(tmp_path, f"optimizer={optimizer}", "optimizer.q=2", "parallel.zo=directions",
                    f"precision.zo_update={update}")
    assert losses(one) == losses(two)
    first, second = weights(one), weights(two)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first[next(iter(first))].dtype == torch.float16 and moved(two) > 0.5


@pytest.mark.parametrize("update", ["fused", pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("optimizer", ["mezo", pytest.param("zo_adam", marks=pytest.mark.slow)])
def test_data_mode_in_fp16_differs_from_one_process_only_by_the_loss_reduction(tmp_path, optimizer, update):
    """The runs agree until a loss value's reduction rounds otherwise, by one fp32 ulp at most (before it the
    weights are identical, so only the reduction can differ); the bounds of the module's note then hold."""
    one, two = both(tmp_path, f"optimizer={optimizer}", "parallel.zo=data", f"precision.zo_update={update}")
    ones, twos = [v for step in losses(one) for v in step], [v for step in losses(two) for v in step]
    first = next((i for i, (a, b) in enumerate(zip(ones, twos)) if a != b), None)
    if first is not None:
        assert abs(ones[first] - twos[first]) <= np.spacing(np.float32(max(ones[first], twos[first])))
    loss_bound, weight_bound, differing_bound = DATA_BOUNDS[optimizer]
    assert max(abs(a - b) for a, b in zip(ones, twos)) <= loss_bound
    saved_one, saved_two = weights(one), weights(two)
    assert max(float((saved_one[k].float() - saved_two[k].float()).abs().max()) for k in saved_one) <= weight_bound
    differing = sum(int((saved_one[k] != saved_two[k]).sum()) for k in saved_one) / \
        sum(v.numel() for v in saved_one.values())
    assert differing <= differing_bound and moved(two) > 0.5


def test_a_half_batchs_fp16_forward_gives_the_whole_batchs_log_probs(quick_cfg):
    """Why data mode's fp16 differences start only in the loss's reduction: each candidate's summed log-prob
    from a rank's half batch (padded to its own longest row) is bit for bit the whole batch's."""
    from zobench.build import build_model, encode_splits, sample_splits
    from zobench.encoding import collate
    from zobench.objective import Objective
    from zobench.spec import RunSpec

    spec = RunSpec.from_cfg(quick_cfg("dtype=float16", "device=cpu"))
    torch.manual_seed(spec.seed)
    model, tokenizer, _ = build_model(spec, max_length=spec.max_length)
    train = encode_splits(spec, sample_splits(spec), tokenizer).train
    objective = Objective(model)
    with torch.no_grad():
        for start in range(0, 16, 4):
            examples = train[start: start + 4]
            whole = objective.option_logprobs(collate(examples, tokenizer.pad_token_id, True))[0]
            halves = [objective.option_logprobs(collate(examples[i: i + 2], tokenizer.pad_token_id, True))[0]
                      for i in (0, 2)]
            assert torch.equal(torch.cat(halves), whole)
