"""More than one process on torch.distributed (torchrun): the world a run belongs to and how models are sharded."""
