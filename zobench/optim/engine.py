"""The one perturbation engine every zeroth-order method uses.

A direction z is never stored: it is regenerated from (step seed, parameter index, block), with one
torch.Generator per device, so it depends neither on the parameters' order nor on how a model is sharded
among GPUs. Each parameter's z is made of independently seeded blocks (block_size: 1M elements on CPU,
16M on CUDA), so a method may regenerate one block of several past directions at once (AdaMeZO) with
block-sized buffers. With θ sharded by FSDP2 (parallel.zo=shard, zobench/parallel/zo_shard.py) a process holds
some rows of a parameter: it draws only the blocks over them and takes their slice (`_z`), z bit for bit.

Three ways to use it:
- in place (MeZO, Malladi et al. 2023, Algorithm 1): `perturb` +eps·z, -2eps·z, then `apply` restores
  and updates in one fused pass, so a step costs 3 regenerations of z instead of MeZO's 4;
- in the forward (Sparse MeZO's memory-efficient S-MeZO-EI, Liu et al. 2024 §4): inside
  `perturbed_in_forward` each module sees θ + scale·z while it runs, built for that call and freed
  after it; θ itself never changes, so a mask computed from θ is the same for +eps, -eps and the update;
- block by block (`update`): a rule gets each block of θ with the blocks of z of any number of seeds,
  for stateful or adaptive updates (AdaMeZO, ZO-Adam, ZO-SGD with momentum).
How each block's arithmetic rounds (precision.zo_update: MeZO's reference rounding or zobench's fused
one) lives in numerics.py; the engine and the rules call it.

Where z's numbers come from (precision.zo_generator): `device`, each parameter's device's generator (fast;
CPU and CUDA draw different numbers, and CUDA's depend on the GPU's SM count), or `portable`, every block
drawn on the host in the host's blocks and copied to the device: the same z on every machine, at the cost
of the host's generator (benchmarks/zo_generator.py). `z_source()` names it; trajectories record it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..parallel.zo_shard import local_piece
from ..precision import Precision
from .numerics import Numerics

BLOCK = 1 << 20  # elements per independently seeded block of z on CPU (4 MiB in fp32)
CUDA_BLOCK = 1 << 24  # on CUDA: see block_size

# (parameter index, a block of θ, flattened and unperturbed) -> a 0/1 tensor z is multiplied by, or None.
Mask = Callable[[int, torch.Tensor], "torch.Tensor | None"]
# (parameter index, a block of θ to change in place, the blocks of z (one per seed, lazily), offset).
Rule = Callable[[int, torch.Tensor, Iterator[torch.Tensor], int], None]


def decays(name: str) -> bool:
    """MeZO's rule (trainer.py zo_update): no weight decay on biases and layer norms."""
    return not ("bias" in name or "layer_norm" in name or "layernorm" in name)


_MASK64 = (1 << 64) - 1


def block_size(device: torch.device) -> int:
    """Elements per independently seeded block of z on `device`.

    A block costs a generator seeding and a few kernels. On CPU, 1M-element blocks keep the threads'
    scratch small and the work evenly shared. On CUDA each kernel launch costs microseconds whatever its
    size, and 1M-element blocks would mean ~13k launches per pass on OPT-13B; 16M-element blocks (32 MiB
    of fp16 scratch) cut that to ~800. z therefore differs between CPU and CUDA, as the generators do anyway.
    """
    return CUDA_BLOCK if device.type == "cuda" else BLOCK


def device_generator(device: torch.device) -> str:
    """The generator z is drawn with on `device`: CUDA's numbers depend on the GPU's SM count."""
    if device.type != "cuda":
        return device.type
    properties = torch.cuda.get_device_properties(device)
    return f"cuda ({properties.name}, {properties.multi_processor_count} SMs)"


class Block(NamedTuple):
    """Where a piece of θ lies in the seeded blocks of z."""
    number: int  # the block of z it belongs to
    skip: int  # where the piece starts inside that block (0 except in a shard's first block)
    length: int  # the whole block's length: z is drawn for the whole block, then sliced (see _z)
    offset: int  # where the piece starts in the tensor this process holds (the state's index for a rule)


def _blocks(flat: torch.Tensor, start: int = 0, total: int | None = None) -> Iterator[tuple[Block, slice]]:
    """(block, slice of `flat`) for each block of z overlapping `flat`, which holds elements [start, start +
    flat.numel()) of a parameter of `total` elements (a shard's rows; one process: all of them)."""
    size = block_size(flat.device)
    total = flat.numel() if total is None else total
    end = start + flat.numel()
    if end == start:  # an empty shard (a rank past the last row) overlaps no block
        return
    for number in range(start // size, -(-end // size)):
        low, high = max(start, number * size), min(end, (number + 1) * size)
        yield Block(number, low - number * size, min(size, total - number * size), low - start), \
            slice(low - start, high - start)


def _block_seed(seed: int, index: int, block: int) -> int:
    """A well-mixed 64-bit seed (splitmix64's finalizer): the CPU generator (mt19937) keeps only the low
    32 bits of a seed, so shifting the step seed up (seed << k) would leave few distinct directions."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class PerturbationEngine:
    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], seed: int,
                 mask: Mask | None = None, precision: Precision | None = None):
        # named_parameters() yields a tied weight (OPT's embedding = LM head) once: perturbed once.
        self.named = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.decays = [decays(name) for name, _ in self.named]
        self.mask = mask  # Sparse MeZO: z is multiplied by the 0/1 mask of the unperturbed θ
        self.numerics = Numerics(precision, self.scratch)  # how each block's arithmetic rounds (numerics.py)
        self.portable = precision is not None and precision.zo_generator == "portable"  # z drawn on the host
        self._seeds = np.random.RandomState(seed)
        self._local = threading.local()  # a generator per device and thread: see _each_block
        # thread pools by use: "z", the blocks (_run); "host-z", the portable z's host draws (_fill_on_host), a
        # pool of its own since a block's work on the first may wait on it
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()
        self.threads: int | None = None  # threads sharing CPU blocks; None: torch.get_num_threads()

    def draw_seed(self) -> int:
        """A fresh direction seed (MeZO: np.random.randint(1000000000) per step)."""
        return int(self._seeds.randint(1_000_000_000))

    def seed_state(self):
        return self._seeds.get_state()

    def set_seed_state(self, state) -> None:
        self._seeds.set_state(state)

    # -- z ---------------------------------------------------------------------------------------
    def _fill(self, out: torch.Tensor, seed: int, index: int, block: int) -> torch.Tensor:
        """Writes block `block` of z(seed) for parameter `index` into the 1-D tensor `out`: N(0, 1)."""
        if self.portable and not (out.device.type == "cpu" and block_size(out.device) == BLOCK):
            return self._fill_on_host(out, seed, index, block)  # (on the host, in its blocks, the draw below is it)
        generator = self._generator(out.device)
        generator.manual_seed(_block_seed(seed, index, block))
        return out.normal_(generator=generator)

    def _z(self, theta: torch.Tensor, seed: int, index: int, block: Block) -> torch.Tensor:
        """The part of block `block` of z(seed) that lies over `theta`, in a scratch buffer. A shard's piece
        of a block is sliced from the whole block drawn: z is the same bit for bit as in one process."""
        if block.skip == 0 and block.length == theta.numel():
            return self._fill(self.scratch(theta), seed, index, block.number)
        whole = self._fill(self.scratch(theta, numel=block.length), seed, index, block.number)
        return whole[block.skip: block.skip + theta.numel()]

    def local(self, index: int) -> torch.Tensor:
        """The part of parameter `index` this process holds and updates: the parameter itself, or its
        shard's rows under FSDP2 (parallel.zo=shard)."""
        name, param = self.named[index]
        piece = local_piece(name, param)
        return param.data if piece is None else piece[0]

    def _pieces(self, index: int) -> Iterator[tuple[Block, torch.Tensor]]:
        """(block, θ's piece in it) for each block of z over the part of parameter `index` held here."""
        name, param = self.named[index]
        piece = local_piece(name, param)
        local, start, total = (param.data, 0, param.numel()) if piece is None else piece
        if not local.is_contiguous():
            raise RuntimeError(f"parameter {name} is not contiguous: the engine updates it block by block")
        flat = local.view(-1)
        for block, part in _blocks(flat, start, total):
            yield block, flat[part]

    def _generator(self, device: torch.device) -> torch.Generator:
        generators = self._local.__dict__.setdefault("generators", {})
        if device not in generators:
            generators[device] = torch.Generator(device=device)
        return generators[device]

    def _fill_on_host(self, out: torch.Tensor, seed: int, index: int, block: int) -> torch.Tensor:
        """The portable z: the host's blocks (BLOCK elements, the host's generator, θ's dtype) drawn on the host
        and copied into `out`, whatever its device. A device block spans whole host blocks (CUDA_BLOCK is a
        multiple of BLOCK), so block b of the host's z is the same numbers on every device. The host blocks of
        one device block are drawn on the engine's threads (the host's generator is the cost: a CUDA block is
        16 of them), each with its own generator and buffer."""
        start, size, host = block * block_size(out.device), out.numel(), torch.device("cpu")

        def draw(first: int) -> None:
            length = min(BLOCK, start + size - first)  # the parameter's last host block may be short
            generator = self._generator(host)
            generator.manual_seed(_block_seed(seed, index, first // BLOCK))
            z = self.scratch(out, "host z", numel=length, device=host).normal_(generator=generator)
            out[first - start: first - start + length].copy_(z)

        self._on_threads("host-z", draw, list(range(start, start + size, BLOCK)))
        return out

    def z_source(self) -> str:
        """What z's numbers depend on besides the seeds, as a trajectory records it: the generator ("portable",
        or each parameter device's: "cpu", "cuda (GPU model, N SMs)") and the parameters' dtype."""
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in self.named})
        generators = ["portable"] if self.portable else sorted({device_generator(p.device) for _, p in self.named})
        return ", ".join(generators + dtypes)

    def direction(self, seed: int, index: int, param: torch.Tensor) -> torch.Tensor:
        """z for parameter `index` under `seed`: N(0, 1) in the parameter's dtype, on its device (unmasked);
        for a sharded parameter, the part over this process's shard."""
        piece = local_piece(self.named[index][0], param)
        local, start, total = (param, 0, param.numel()) if piece is None else piece
        z = torch.empty(local.shape, device=local.device, dtype=local.dtype)
        flat = z.view(-1)
        for block, part in _blocks(flat, start, total):
            flat[part] = self._z(flat[part], seed, index, block)
        return z

    # -- in place (MeZO) ---------------------------------------------------------------------------
    def _unmasked_only(self) -> None:
        if self.mask is not None:  # a mask of a perturbed θ would differ from the unperturbed one's
            raise RuntimeError("a masked engine perturbs in the forward (perturbed_in_forward), never in place")

    def _each_block(self, work) -> None:
        """work(index, block, θ block) for every block of every parameter held here, θ changed in place.

        Block by block, z never takes more than a block of memory (4 MiB) per thread. On CPU the blocks
        are shared among threads: torch's normal_ runs on one core, and each block's z comes from its
        own seed, so the order does not matter and the result is the same bit for bit (issue #8: z
        generation was a third of a CPU step). Other devices' blocks run on this thread, in order.
        """
        self._run(work, [(index, block, theta) for index in range(len(self.named))
                         for block, theta in self._pieces(index)])

    def _run(self, work, items) -> None:
        """work(*item) for each item (a block's arguments, its tensors on one device or another): CPU items
        shared among the pool's threads, the others in order on this thread."""
        self._on_threads("z", lambda item: work(*item), [item for item in items if item[-1].device.type == "cpu"])
        self._on_threads(None, lambda item: work(*item), [item for item in items if item[-1].device.type != "cpu"])

    def _on_threads(self, pool: str | None, work, items: list) -> None:
        """work(item) for each item, in the caller's grad mode (modes are per thread): shared among the threads
        of the engine's pool `pool`, or in order on this thread (pool None, one thread, or one item)."""
        inference = torch.is_inference_mode_enabled()

        def guarded(item):
            with torch.inference_mode(inference), torch.no_grad():
                work(item)

        threads = self.threads or torch.get_num_threads()
        if pool is None or threads <= 1 or len(items) <= 1:
            for item in items:
                guarded(item)
            return
        with self._pools_lock:
            if pool not in self._pools:
                self._pools[pool] = ThreadPoolExecutor(threads, thread_name_prefix=f"zobench-{pool}")
        list(self._pools[pool].map(guarded, items))

    def scratch(self, theta: torch.Tensor, slot: str = "z", dtype: torch.dtype | None = None,
                numel: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """This thread's block-sized buffer `slot` (one per slot, dtype and device), as long as `theta` (or `numel`),
        in θ's dtype and on its device unless `dtype`/`device` say otherwise: no allocation per block, which in
        worker threads would leave freed blocks in per-thread malloc arenas (+90 MiB measured). Rules use their
        own slots (AdaMeZO's m and v, say)."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (slot, dtype or theta.dtype, device or theta.device)
        length = theta.numel() if numel is None else numel
        if key not in buffers or buffers[key].numel() < length:  # (a block is never longer than block_size)
            with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
                buffers[key] = torch.empty(max(block_size(key[2]), length), dtype=key[1], device=key[2])
        return buffers[key][:length]

    def perturb(self, seed: int, scale: float) -> None:
        """θ ← θ + scale·z(seed)."""
        self._unmasked_only()
        self._each_block(lambda index, block, theta: self.numerics.shift(
            theta, self._z(theta, seed, index, block), scale))

    def apply(self, terms: list[tuple[int, float, float]], lr: float, lr_times_wd: float = 0.0,
              replay: Sequence[float] = ()) -> None:
        """One pass: restore, decay and update, regenerating each term's z once.

        Each term (seed, restore, c) means θ ← θ + restore·z(seed) (undo a perturbation), then the
        MeZO update θ ← θ − lr·(Σ c·z(seed) + wd·θ), the decay on parameters that decay (and, with a
        mask, on the weights it trains). How it rounds: numerics.py (fused: one rounding; reference: as
        MeZO's trainer.py). `replay`: perturbation scales θ is first shifted by along the first term's
        z, for a masked engine that perturbed in the forward and so never moved θ (Sparse MeZO).
        """
        if replay:
            terms = sorted(terms, key=lambda term: term[1] == 0.0)  # the replayed, restored term first

        def one(index, block, theta):
            mask = self.mask(index, theta) if self.mask is not None else None
            zs = self._block_stream([seed for seed, _, _ in terms], index, theta, block, mask, None)
            self.numerics.restore_and_descend(theta, zip([(restore, c) for _, restore, c in terms], zs), lr,
                                              lr_times_wd if self.decays[index] else 0.0, mask, replay)

        self._each_block(one)

    # -- in the forward (Sparse MeZO) --------------------------------------------------------------
    @contextmanager
    def perturbed_in_forward(self, model: torch.nn.Module, seed: int, *scales: float):
        """Inside, every module's forward sees its own parameters at θ + scale·z(seed) (masked), or, given
        several scales, at θ shifted by each in turn (MeZO's +eps then −2eps, rounded as MeZO's are).

        The perturbed copy of a parameter lives only while its module runs (one layer at a time, as
        MeZO's in-place z does), and θ is never written: leaving restores it exactly. A tied weight is
        rebuilt in each module that uses it. Assumes, as in HF models, that a module reads its
        parameters only in its own forward.
        """
        # Parameters are found by the module and attribute holding them: under FSDP2 (parallel.zo=shard) a module
        # holds, while it runs, a gathered copy of the sharded parameter the engine knows, not the parameter itself.
        index_of = {id(p): i for i, (_, p) in enumerate(self.named)}
        owned = {(id(m), attr): index_of[id(p)] for m in model.modules()
                 for attr, p in m.named_parameters(recurse=False) if id(p) in index_of}
        swapped: dict[int, tuple[torch.nn.Parameter, torch.Tensor, torch.nn.Module]] = {}

        def before(module, args):
            for attr, param in module.named_parameters(recurse=False):
                index = owned.get((id(module), attr))
                if index is not None and id(param) not in swapped:
                    swapped[id(param)] = (param, param.data, module)
                    param.data = self._perturbed_copy(seed, index, param.data, scales)

        def after(module, args, output):
            for param in module.parameters(recurse=False):
                if id(param) in swapped and swapped[id(param)][2] is module:
                    param.data = swapped.pop(id(param))[1]

        owners = [m for m in model.modules()
                  if any((id(m), attr) in owned for attr, _ in m.named_parameters(recurse=False))]
        handles = [m.register_forward_pre_hook(before) for m in owners]
        handles += [m.register_forward_hook(after) for m in owners]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for param, data, _ in swapped.values():  # a forward that raised
                param.data = data
            swapped.clear()

    @torch.no_grad()
    def _perturbed_copy(self, seed: int, index: int, theta: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
        out = torch.empty_like(theta)
        flat, source = out.view(-1), theta.reshape(-1)

        def one(block, theta_part, part):
            z = self._z(part, seed, index, block)
            keep = self.mask(index, theta_part) if self.mask is not None else None
            if keep is not None:
                z.mul_(keep)
            part.copy_(theta_part)
            for scale in scales:  # rounded as the engine's in-place perturbations are
                self.numerics.shift(part, z, scale)

        self._run(one, [(block, source[part], flat[part]) for block, part in _blocks(flat)])
        return out

    # -- block by block (stateful and adaptive rules) ------------------------------------------------
    def update(self, seeds: Sequence[int], rule: Rule, restore: tuple[int, float] | None = None) -> None:
        """One pass over θ in blocks: `rule(index, θ block, zs, offset)` changes the block in place.

        zs yields the block of z(seed) for each seed in order, masked by the engine's mask of the block's
        θ as it was on entry; each z lives in one buffer, valid until the next is drawn. `restore` =
        (seed, scale) undoes an in-place perturbation, θ += scale·z(seed), fused into the pass: it is done
        when that seed's block is drawn, before the rule sees it. Blocks run on several threads on CPU
        (see _each_block): a rule must touch only its own block, using `scratch` for buffers.
        """
        if restore is not None and restore[0] not in seeds:
            raise ValueError(f"the restored seed {restore[0]} must be one of the seeds drawn")

        def one(index, block, theta):
            keep = self.mask(index, theta) if self.mask is not None else None
            rule(index, theta, self._block_stream(seeds, index, theta, block, keep, restore), block.offset)

        self._each_block(one)

    def _block_stream(self, seeds, index, theta, block, keep, restore) -> Iterator[torch.Tensor]:
        pending = restore
        for seed in seeds:
            z = self._z(theta, seed, index, block)
            if keep is not None:
                z.mul_(keep)
            if pending is not None and seed == pending[0]:
                self.numerics.shift(theta, z, pending[1])
                pending = None  # once, even if an old seed repeats
            yield z
