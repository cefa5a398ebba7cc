"""`train.epochs`: a length in passes over the training set, resolved to train.steps once the data is known.

HF Trainer's rule, which MeZO's FT and head-tuning rows ran through (finetune.sh: `--num_train_epochs 5
--evaluation_strategy epoch`, batch 8, no gradient accumulation): an epoch is ceil(n_train / batch) steps,
the last batch smaller (the sampler in optim/base.py batches so), and the dev evaluation comes once per epoch.
Tasks with fewer than 1,000 training examples (CB, COPA, WSC) so get fewer steps, as they did in MeZO's runs.
"""

from __future__ import annotations

import math


def resolve_epochs(train_cfg, n_train: int) -> bool:
    """Set train.steps and train.eval_interval from train.epochs (null: leave them); True if it did."""
    epochs = train_cfg.get("epochs")
    if epochs is None:
        return False
    per_epoch = max(math.ceil(n_train / int(train_cfg.batch_size)), 1)
    train_cfg.steps = int(epochs) * per_epoch
    train_cfg.eval_interval = per_epoch  # HF evaluation_strategy="epoch"
    return True
