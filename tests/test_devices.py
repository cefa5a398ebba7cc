"""CUDA and multi-device paths (issue #21), simulated on CPU: a model split over devices, peak memory on
every GPU, device maps with headroom, a random init that does not depend on the map, and z's generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zobench.encoding import SequenceBatch
from zobench.objective import Objective


# -- a model split over devices: the head on another device than the body's output ------------------------
class _Out:
    def __init__(self, hidden):
        self.last_hidden_state = hidden


class _Body(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(16, hidden)

    def forward(self, input_ids, attention_mask):
        return _Out(self.embed(input_ids))


class _HeadOnAnotherDevice(nn.Module):
    """An LM head whose weight lives on another device ("meta" stands for the last GPU): it refuses states
    that were not moved to it, and hands back logits as a real head on that device would."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden, device="meta"))
        self.seen = []

    def forward(self, states):
        assert states.device == self.weight.device, f"states on {states.device}, head on {self.weight.device}"
        self.seen.append(states.shape)
        return torch.zeros(states.shape[0], self.weight.shape[0])


class _SplitModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _Body(8)
        self.lm_head = _HeadOnAnotherDevice(8, 16)

    @property
    def base_model(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head


def _batch() -> SequenceBatch:
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]])
    options = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    return SequenceBatch(ids, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), options, torch.tensor([0, 0]),
                         torch.tensor([0, 1]), torch.tensor([0]), classification=True)


def test_option_rows_go_to_the_heads_device_of_a_split_model():
    model = _SplitModel()
    objective = Objective(model)
    loss = objective(_batch())
    assert model.lm_head.seen == [torch.Size([3, 8])]  # the 3 option rows alone, moved to the head's device
    assert loss.device.type == "cpu" and torch.isclose(loss, torch.log(torch.tensor(2.0)))  # uniform logits
