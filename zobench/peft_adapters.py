"""PEFT adapters, `peft=lora` / `peft=prefix` (conf/peft/), through the `peft` library with MeZO's settings.

Only the adapter's weights keep requires_grad, so every optimizer trains them alone: the ZO engine
perturbs only parameters with requires_grad, and the first-order optimizers collect theirs the same way.
The adapter's initial weights are drawn from the run's seed, so a resumed or replayed run rebuilds the
very model its trajectory started from.

MeZO (paper App. E.5; large_models/lora.py, prefix.py): LoRA with r=8, alpha=16 on the attention query
and value projections, no dropout; prefix tuning with 5 tokens, no reparameterization, initialised with
the keys and values of random vocabulary tokens run through the model ("crucial to make prefix tuning
stable with MeZO").
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import ZobenchError

log = logging.getLogger(__name__)

METHODS = ("none", "lora", "prefix")
PREFIX_INITS = ("real_activations", "random")


def apply_peft(model, spec: dict[str, Any] | None, seed: int):
    """(the model the runner trains, scores and checkpoints, the object whose save_pretrained is written).

    Without PEFT both are `model`. With LoRA the runner trains the base model with the adapters inside
    its layers (so the objective keeps computing logits only where it needs them); with prefix tuning it
    trains the PEFT model, whose forward feeds the prefix to every layer. save_pretrained writes the
    adapter alone (load it with peft.PeftModel.from_pretrained on the same base model).
    """
    method = str((spec or {}).get("name", "none"))
    if method == "none":
        return model, model
    if method not in METHODS:
        raise ZobenchError(f"unknown peft '{method}'; valid: {', '.join(METHODS)}")
    peft = _import_peft(method)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # the adapter's init depends on the seed alone
        torch.manual_seed(int(seed))
        if method == "lora":
            config = peft.LoraConfig(task_type="CAUSAL_LM", r=int(spec["r"]), lora_alpha=int(spec["alpha"]),
                                     lora_dropout=float(spec.get("dropout", 0.0)),
                                     target_modules=list(spec["target_modules"]))
            wrapped = _wrap(peft, model, config, method)
        else:
            tokens = int(spec["num_virtual_tokens"])
            init = str(spec.get("init", "real_activations"))
            if init not in PREFIX_INITS:
                raise ZobenchError(f"peft.init must be one of {', '.join(PREFIX_INITS)}, got {init}")
            wrapped = _wrap(peft, model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens,
                                                                  prefix_projection=False), method)
            if init == "real_activations":
                vocabulary = int(wrapped.get_base_model().config.vocab_size)
                init_prefix_from_tokens(wrapped, torch.randint(0, vocabulary, (1, tokens)))
    wrapped.eval()
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    log.info("peft=%s: %d trainable parameters", method, trainable)
    return (wrapped.get_base_model() if method == "lora" else wrapped), wrapped


def _import_peft(method: str):
    try:
        import peft
    except ImportError as error:
        raise ZobenchError(f"peft={method} needs the peft package: pip install 'zobench[peft]'") from error
    return peft


def _wrap(peft, model, config, method: str):
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules the architecture does not have
        raise ZobenchError(f"peft={method}: {str(error).splitlines()[0]}") from error


@torch.no_grad()
def init_prefix_from_tokens(wrapped, tokens: torch.Tensor) -> None:
    """The prefix becomes the keys and values these tokens have in each layer (MeZO prefix.py, init_by_real_act).

    PEFT's prefix table holds, per virtual token, every layer's key then value, each flattened as (head, dim).
    """
    base = wrapped.get_base_model()
    embedding = wrapped.prompt_encoder[wrapped.active_adapter].embedding.weight
    output = base(input_ids=tokens.to(base.get_input_embeddings().weight.device), use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values
    columns = []
    for key, value in _layer_key_values(cache):  # each [1, heads, tokens, head_dim]
        columns += [key[0].transpose(0, 1).reshape(tokens.shape[1], -1),
                    value[0].transpose(0, 1).reshape(tokens.shape[1], -1)]
    table = torch.cat(columns, dim=1)
    if table.shape != embedding.shape:
        raise ZobenchError(f"peft=prefix: the model's keys and values ({tuple(table.shape)}) do not fit the prefix "
                           f"table ({tuple(embedding.shape)}); use peft.init=random")
    embedding.copy_(table.to(embedding.device, embedding.dtype))


def _layer_key_values(cache):
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(key, value) for key, value in cache]  # legacy tuples


def prefix_length(model) -> int:
    """How many virtual tokens a PEFT prefix-tuning model puts before each sequence (0 for any other model)."""
    config = getattr(model, "active_peft_config", None)
    kind = getattr(config, "peft_type", None)
    if getattr(kind, "value", kind) != "PREFIX_TUNING":
        return 0
    return int(config.num_virtual_tokens)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """The tokens `model.generate` adds after each (left-padded) row.

    A prefix-tuning model continues from its prefix given as an already filled cache: PEFT hands the
    prefix to generate as past_key_values, which recent transformers replace by generate's own cache,
    so generation would silently run without the prefix.
    """
    length = prefix_length(model)
    if not length:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[:, input_ids.shape[1]:]
    rows = input_ids.shape[0]
    # The prefix's positions, already in the cache: generate never reads these ids.
    held = torch.full((rows, length), int(kwargs.get("pad_token_id") or 0), dtype=input_ids.dtype,
                      device=input_ids.device)
    output = model.get_base_model().generate(
        input_ids=torch.cat([held, input_ids], dim=1),
        attention_mask=torch.cat([torch.ones_like(held, dtype=attention_mask.dtype), attention_mask], dim=1),
        past_key_values=model.get_prompt(batch_size=rows), **kwargs)
    return output[:, length + input_ids.shape[1]:]
