"""FSDP2 (torch.distributed.fsdp.fully_shard) over a decoder: each decoder layer one unit, then the root.

The unit per decoder layer is MeZO's `--fsdp "full_shard auto_wrap"` (large_models/finetune_fsdp.sh, which
wraps each OPTDecoderLayer); the root holds the embeddings, final norm and head.
"""

from __future__ import annotations

import torch

from ..errors import ZobenchError


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM (OPT: model.decoder.layers, LLaMA: model.layers), PEFT-wrapped or not."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ZobenchError(f"{type(model).__name__}: no decoder layers found to shard (a `layers` ModuleList)")


def shard(model: torch.nn.Module, mp_policy=None, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shards `model` in place over the default process group's ranks and returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
