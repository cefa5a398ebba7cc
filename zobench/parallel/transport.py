"""Bytes between the ranks of a torchrun job, as uint8 tensors (a length first, then the bytes): never a
pickle, which torch's object collectives would load and which could run code."""

from __future__ import annotations

import torch


def collective_device() -> torch.device:
    """Where a collective's tensors live: the rank's GPU under NCCL, the host under gloo."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank (the others pass None)."""
    import torch.distributed as dist

    device = collective_device()
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = torch.zeros(int(length), dtype=torch.uint8, device=device)
    if data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return buffer.cpu().numpy().tobytes()


def send_bytes(data: bytes, dst: int) -> None:
    import torch.distributed as dist

    device = collective_device()
    dist.send(torch.tensor([len(data)], dtype=torch.int64, device=device), dst)
    if data:
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), dst)


def recv_bytes(src: int) -> bytes:
    import torch.distributed as dist

    device = collective_device()
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    if not int(size):
        return b""
    buffer = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.recv(buffer, src)
    return buffer.cpu().numpy().tobytes()
