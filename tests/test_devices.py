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


# -- peak memory on every GPU ---------------------------------------------------------------------------
GiB = 1 << 30


def test_peak_memory_is_reset_and_read_on_every_gpu(monkeypatch):
    from zobench import run_record

    allocated, reserved, resets = {0: 3 * GiB, 1: 5 * GiB}, {0: 4 * GiB, 1: 7 * GiB}, []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda gpu: resets.append(gpu.index))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda gpu: allocated[gpu.index])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda gpu: reserved[gpu.index])
    first = torch.device("cuda", 0)  # the run's device: where its batches go (the first shard)

    run_record.reset_peak_memory(first)
    figures = run_record.final_figures({"train_wall_clock_s": 1.0, "forward_passes": 2, "tokens": 10}, 2.0, first)

    assert resets == [0, 1]
    assert figures["peak_memory_bytes"] == 8 * GiB and figures["peak_memory_method"] == "cuda_max_allocated"
    assert figures["peak_memory_allocated_max_bytes"] == 5 * GiB
    assert figures["peak_memory_allocated_sum_bytes"] == 8 * GiB
    assert figures["peak_memory_reserved_max_bytes"] == 7 * GiB
    assert figures["peak_memory_reserved_sum_bytes"] == 11 * GiB
    assert figures["peak_memory_devices"] == {"cuda:0": {"allocated": 3 * GiB, "reserved": 4 * GiB},
                                              "cuda:1": {"allocated": 5 * GiB, "reserved": 7 * GiB}}


def test_cpu_runs_have_no_gpu_figures():
    from zobench import run_record

    figures = run_record.final_figures({"train_wall_clock_s": 1.0, "forward_passes": 2, "tokens": 10}, 2.0,
                                       torch.device("cpu"))
    assert figures["peak_memory_method"] == "process_vmhwm" and figures["peak_memory_bytes"] > 0
    assert all(figures[key] is None for key in run_record.GPU_PEAK_KEYS)
