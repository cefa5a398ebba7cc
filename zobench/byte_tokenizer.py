"""A byte-level tokenizer built in code: no download, the same ids on every machine.

Used by the tiny offline models (and by random-init models of real size for benchmarks). Every byte is
one token (GPT-2's byte-to-unicode alphabet, no merges), plus <pad>, </s> (BOS/EOS as in OPT) and <unk>.
"""

from __future__ import annotations

from functools import lru_cache

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


@lru_cache(maxsize=1)
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    # Like OPT's tokenizer: every encoded text starts with </s> as BOS.
    core.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
