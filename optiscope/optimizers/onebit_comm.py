"""1-bit Adam's error-compensated compressed all-reduce, over ``torch.distributed``.

`onebit_allreduce` averages tensors over a process group with one sign bit per entry and a
scale per tensor, in two collectives (``all_to_all_single`` and ``all_gather``), with error
feedback on the worker and the server side; `optiscope.optimizers.onebit.OneBitAdam` averages
its momentum with it. On CUDA tensors the sign bits can be packed by a Triton kernel
(`optiscope.kernels.onebit`), elsewhere by torch ops (`pack_signs`); the two pack the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CompressionReport", "chunk_size", "compressed_bytes", "ring_allreduce_bytes",
           "onebit_allreduce", "pack_signs", "unpack_signs"]


def _world(group: Any) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)



@dataclass
class CompressionReport:
    """What one compressed all-reduce cost and lost, on this rank.

    Attributes:
        bytes_sent: bytes this rank sent over the network (`compressed_bytes`).
        fp32_ring_bytes: bytes a ring all-reduce of the same tensors in float32 sends per rank
            (`ring_allreduce_bytes`).
        probe_bytes: bytes this rank sent in the same step for the monitor's v without freezing
            (a float32 ring all-reduce of the sampled gradients of every tracked tensor; see
            `OneBitAdam.unfrozen_second_at`); 0 without tracked coordinates or in one process.
        worker_error_sq, worker_input_sq: per tensor, Σ(x − s·sign x)² and Σx² of this rank's
            worker compression of x = m + worker error (float32 vectors), or None when not asked.
        server_error_sq, server_input_sq: the same for this rank's server compression of its
            chunk (the average plus the server error), or None when not asked.
    """

    bytes_sent: int
    fp32_ring_bytes: int
    probe_bytes: int = 0
    worker_error_sq: Tensor | None = field(default=None, repr=False)
    worker_input_sq: Tensor | None = field(default=None, repr=False)
    server_error_sq: Tensor | None = field(default=None, repr=False)
    server_input_sq: Tensor | None = field(default=None, repr=False)


def chunk_size(numel: int, world_size: int) -> int:
    """Entries of one rank's chunk of a ``numel``-entry tensor: the tensor is zero-padded to
    ``world_size`` equal chunks, each a whole number of bytes once packed (a multiple of 8)."""
    return 8 * math.ceil(numel / (8 * world_size))


def compressed_bytes(numels: list[int], world_size: int) -> int:
    """Bytes each rank sends in one `onebit_allreduce` of tensors of ``numels`` entries.

    All-to-all: each of the other ranks gets its chunk of the packed signs and this rank's
    float32 scales; all-gather: each of them gets this rank's packed server chunk and scales.
    """
    live = [n for n in numels if n]
    per_peer = sum(chunk_size(n, world_size) // 8 for n in live) + 4 * len(live)
    return 2 * (world_size - 1) * per_peer


def ring_allreduce_bytes(numels: list[int], world_size: int) -> int:
    """Bytes each rank sends in a ring all-reduce of the same tensors in float32:
    2(w − 1)/w × 4 bytes × n."""
    return 2 * (world_size - 1) * 4 * sum(numels) // world_size


def onebit_allreduce(tensors: list[Tensor], worker_errors: list[Tensor],
                     server_errors: list[Tensor], *, process_group: Any = None,
                     backend: str = "torch",
                     with_errors: bool = False) -> tuple[list[Tensor], CompressionReport]:
    """The error-compensated 1-bit compressed average of ``tensors`` over the process group.

    For each tensor x (flattened, d entries, zero-padded to w chunks of `chunk_size` entries):

    1. Worker: x ← x + e_w; s = ‖x‖/√d; e_w ← x − s·sign(x) (sign(0) = +1).
    2. All-to-all: rank r receives chunk r of every rank's packed signs, with their scales.
    3. Server (rank r, its chunk): c = Σ_i (s_i/w)·sign_i, in rank order i = 0..w-1, padding
       zeroed; c ← c + e_s; s' = ‖c‖/√(real entries); e_s ← c − s'·sign(c).
    4. All-gather of the packed server signs and scales; the result is s'_j·sign_j over the
       chunks j, padding stripped.

    Every rank returns the same tensors. With w = 1 no collective runs and the result is two
    rounds of 1-bit compression with error feedback. Empty tensors return empty and send nothing.
    Every rank must pass tensors of the same shapes in the same order.

    Args:
        tensors: what to average (any floating dtype; read as float32). Not modified.
        worker_errors: float32, one per tensor, of its number of entries; updated in place.
        server_errors: float32, one per tensor, of ``chunk_size(numel, w)`` entries; updated in
            place.
        process_group: the group, or None (the default group when torch.distributed is
            initialized, else a world of one).
        backend: ``"torch"`` or ``"triton"``, what packs the sign bits (default ``"torch"``).
        with_errors: also compute the compression errors of the report (default False).

    Returns:
        (averaged float32 tensors of the inputs' shapes, the `CompressionReport`).
    """
    world, rank = _world(process_group)
    if len(worker_errors) != len(tensors) or len(server_errors) != len(tensors):
        raise ValueError(f"onebit_allreduce: {len(tensors)} tensors need as many worker and "
                         f"server error buffers, got {len(worker_errors)} and "
                         f"{len(server_errors)}")
    for x, ew, es in zip(tensors, worker_errors, server_errors):
        want = chunk_size(x.numel(), world)
        if ew.numel() != x.numel() or es.numel() != want:
            raise ValueError(
                f"onebit_allreduce: a tensor of {x.numel()} entries over {world} rank(s) needs a "
                f"worker error of {x.numel()} entries and a server error of {want}, got "
                f"{ew.numel()} and {es.numel()}; were the buffers made for another world size?")
    pack = _packer(backend)
    numels = [x.numel() for x in tensors]
    report = CompressionReport(compressed_bytes(numels, world), ring_allreduce_bytes(numels, world))
    outputs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in tensors]
    live = [i for i, n in enumerate(numels) if n]
    if not live:
        if with_errors:
            zeros = torch.zeros(len(tensors))
            report.worker_error_sq = report.worker_input_sq = zeros
            report.server_error_sq = report.server_input_sq = zeros.clone()
        return outputs, report
    device = tensors[live[0]].device
    chunks = [chunk_size(numels[i], world) for i in live]
    sign_bytes = sum(c // 8 for c in chunks)
    errors = {key: torch.zeros(len(tensors), dtype=torch.float32, device=device)
              for key in ("w_err", "w_in", "s_err", "s_in")} if with_errors else None

    # 1. worker compression, packed as [destination rank, bytes]
    packed, scales = [], []
    for k, i in enumerate(live):
        x = tensors[i].reshape(-1).float() + worker_errors[i].reshape(-1)
        norm = torch.linalg.vector_norm(x)
        scale = norm / math.sqrt(numels[i])
        err = x - scale * _sign(x)
        worker_errors[i].copy_(err.view_as(worker_errors[i]))
        if errors is not None:
            errors["w_err"][i] = torch.linalg.vector_norm(err).square()
            errors["w_in"][i] = norm.square()
        packed.append(pack(_padded(x, chunks[k] * world)).view(world, chunks[k] // 8))
        scales.append(scale)
    scale_bytes = torch.stack(scales).view(torch.uint8)
    send = torch.cat([*packed, scale_bytes.expand(world, scale_bytes.numel())], dim=1)

    # 2. all-to-all: row j of `received` is what rank j sent to this rank
    received = _all_to_all(send, process_group, world)
    from_scales = received[:, sign_bytes:].clone(memory_format=torch.contiguous_format).view(
        torch.float32)  # [world, live]

    # 3. server: average this rank's chunk, compress it again with the server error
    packed, scales = [], []
    offset = 0
    for k, i in enumerate(live):
        c, nbytes = chunks[k], chunks[k] // 8
        signs = unpack_signs(received[:, offset:offset + nbytes].reshape(-1)).view(world, c)
        offset += nbytes
        acc = torch.zeros(c, dtype=torch.float32, device=device)
        for j in range(world):
            acc.add_(signs[j] * (from_scales[j, k] / world))
        real = min(max(numels[i] - rank * c, 0), c)
        acc[real:] = 0
        acc.add_(server_errors[i])
        norm = torch.linalg.vector_norm(acc[:real])
        scale = norm / math.sqrt(real) if real else norm
        err = acc - scale * _sign(acc)
        err[real:] = 0
        server_errors[i].copy_(err)
        if errors is not None:
            errors["s_err"][i] = torch.linalg.vector_norm(err).square()
            errors["s_in"][i] = norm.square()
        packed.append(pack(acc))
        scales.append(scale)
    mine = torch.cat([*packed, torch.stack(scales).view(torch.uint8)])

    # 4. all-gather the server chunks; every rank decompresses the same bytes
    gathered = _all_gather(mine, process_group, world)  # [world, bytes]
    server_scales = gathered[:, sign_bytes:].clone(memory_format=torch.contiguous_format).view(
        torch.float32)  # [world, live]
    offset = 0
    for k, i in enumerate(live):
        c, nbytes = chunks[k], chunks[k] // 8
        signs = unpack_signs(gathered[:, offset:offset + nbytes].reshape(-1)).view(world, c)
        offset += nbytes
        full = (signs * server_scales[:, k:k + 1]).reshape(-1)
        outputs[i].copy_(full[:numels[i]].view(outputs[i].shape))
    if errors is not None:
        report.worker_error_sq, report.worker_input_sq = errors["w_err"], errors["w_in"]
        report.server_error_sq, report.server_input_sq = errors["s_err"], errors["s_in"]
    return outputs, report


def _sign(x: Tensor) -> Tensor:
    """±1 as float32, with sign(0) = +1 (one bit has no zero)."""
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def _padded(x: Tensor, length: int) -> Tensor:
    """``x`` zero-padded to ``length`` entries (padding packs as +1 and is never read back)."""
    if x.numel() == length:
        return x
    out = x.new_zeros(length)
    out[: x.numel()] = x
    return out


def _all_to_all(send: Tensor, group: Any, world: int) -> Tensor:
    if world == 1:
        return send
    received = torch.empty_like(send)
    dist.all_to_all_single(received.view(-1), send.view(-1), group=group)
    return received


def _all_gather(mine: Tensor, group: Any, world: int) -> Tensor:
    if world == 1:
        return mine.view(1, -1)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts)


# ================================================================================ bit packing

_BIT_WEIGHTS: dict[torch.device, Tensor] = {}


def _weights(device: torch.device) -> tuple[Tensor, Tensor]:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    shifts = _BIT_WEIGHTS[device]
    return shifts, torch.bitwise_left_shift(torch.ones_like(shifts), shifts)


def pack_signs(x: Tensor) -> Tensor:
    """One bit per entry of ``x`` (1 where x >= 0), 8 per uint8, the first entry in the most
    significant bit (numpy's ``packbits`` order). ``x.numel()`` must be a multiple of 8."""
    if x.numel() % 8:
        raise ValueError(f"pack_signs: the number of entries must be a multiple of 8, got "
                         f"{x.numel()}; zero-pad the tensor first")
    _, weights = _weights(x.device)
    bits = (x.reshape(-1, 8) >= 0).to(torch.uint8)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: Tensor) -> Tensor:
    """The ±1 float32 signs of `pack_signs`, 8 per byte."""
    shifts, _ = _weights(packed.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed.reshape(-1, 1), shifts), 1)
    return (bits.to(torch.float32) * 2 - 1).reshape(-1)


def _packer(backend: str):
    if backend == "torch":
        return pack_signs
    if backend == "triton":
        from optiscope.kernels.onebit import pack_signs_triton
        return pack_signs_triton
    raise ValueError(f"onebit_allreduce: backend must be 'torch' or 'triton', got {backend!r}")
