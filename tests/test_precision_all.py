"""Every optimizer in fp16 and bf16 (issue 13): 20 steps at its default (paper) learning rate through the
runner end `completed` with finite weights, and the first-order ones lower the training loss.

The torch baselines run as MeZO's FT row ran them (precision.master_weights, grad_clip 1.0: HF Trainer
--fp16); every other setting is the run's default precision policy. The training loss is compared in fp32,
on the run's own training examples, at the initial weights and at the saved final ones, so 16-bit
forward rounding cannot hide (or fake) a small decrease.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import QUICK
from zobench.spec import RunSpec
from zobench.configs import compose
from zobench.data import sample_task
from zobench.encoding import Encoder, collate
from zobench.models import load_model
from zobench.objective import Objective
from zobench.run import run
from zobench.tasks import PromptTemplate

ZEROTH_ORDER = ["mezo", "sparse_mezo", "adamezo", "zo_sgd_sign", "zo_sgd_momentum", "zo_adam"]
FIRST_ORDER = ["addax", "ip_sgd", "sgd", "adam"]  # Addax: mostly its in-place first-order half at these lrs
AS_HF_FP16 = ["precision.master_weights=true", "precision.grad_clip=1.0"]
SETTINGS = ["train.steps=20", "train.eval_interval=0", "data.n_train=4", "data.n_dev=2", "data.n_test=2",
            "train.batch_size=4", "save_model=true", "checkpoint.every=1000"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 16-bit CPU kernels on tiny tensors


def fp32_training_loss(cfg, weights: dict[str, torch.Tensor] | None) -> float:
    """The loss over the run's training examples of an fp32 copy of the model (initial, or `weights`)."""
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), torch.device("cpu"),
                                  torch.float32)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    template, encoder = PromptTemplate(task), Encoder(tokenizer, int(cfg.max_length))
    examples = [encoder.encode(template.render(row)) for row in sample_task(task, RunSpec.from_cfg(cfg).data).train]
    with torch.no_grad():
        return float(Objective(model)(collate(examples, tokenizer.pad_token_id, classification=True)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ZEROTH_ORDER + FIRST_ORDER)
def test_twenty_steps_in_16_bit(tmp_path, name, dtype):
    extra = AS_HF_FP16 if name in ("sgd", "adam") else []
    cfg = compose(QUICK + SETTINGS + [f"optimizer={name}", f"dtype={dtype}", *extra])
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed", metrics.get("error")
    assert metrics["steps"] == 20 and metrics["precision"]["weights"] == dtype
    weights = load_file(str(next(tmp_path.rglob("model.safetensors"))))
    assert all(torch.isfinite(w).all() for w in weights.values())
    if name in FIRST_ORDER:
        before, after = fp32_training_loss(cfg, None), fp32_training_loss(cfg, weights)
        assert math.isfinite(after) and after < before, (before, after)
