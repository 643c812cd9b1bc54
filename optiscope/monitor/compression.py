"""What compressing the optimizer's state costs: measured on the state it compresses, and probed
on the state of an uncompressed run.

Requantization error (``moment1_quant_error``, ``moment2_quant_error``): an optimizer that keeps
its moments compressed (torchao's AdamW8bit/4bit/Fp8 subclasses, bitsandbytes' 8-bit uint8
codes, or plain bf16/fp16 moments) rounds them again at every step. On the coordinate sample of
a sampled step the monitor reads the stored m before the step and computes what an exact step
would store, β1·m_{t−1} + (1 − β1)·g_t (v likewise with g², β2), in float64; the error is the
distance of the stored m_t from it. Adam's family only (a group with ``betas``); the g is the one
the update sees: unscaled, negated under ``maximize``, plus λθ under coupled weight decay
(torchao's Adam, torch's Adam), untouched by decoupled decay (AdamW, every bitsandbytes Adam).

Probes (``probe_int8_m`` ... ``probe_int4_v_rank1``): on an uncompressed run, whole blocks of m
and v are quantized as the common schemes would and the relative error recorded:

- int8: blockwise absmax per 256 entries with the dynamic (tree) code of Dettmers et al. 2022,
  signed for m and unsigned for v: what bitsandbytes and torchao store.
- int4, block 128: m with the signed 4-bit dynamic code (torchao's AdamW4bit); v with absmax
  and the linear code that has a zero, so every entry under 1/30 of its block's maximum becomes 0
  (the zero-point problem of Li et al. 2023, which turns 1/√v into 1/ε).
- int4 v, rank-1: Li et al.'s fix: each entry of a matrix is normalised by min(its row's max,
  its column's max) over the whole tensor, and coded with the linear code without zero,
  (k + 1)/16. A vector is normalised by its maximum; a tensor of more dimensions is read as
  ``[shape[0], -1]``.

The blocks are those the top-k probe samples (whole 256-entry blocks inside them), else blocks
drawn here, as many as the coordinate sample has entries; only full blocks count (bitsandbytes
and torchao keep a tensor whose size is not a multiple of the block in float32). The blocks of
every tensor are gathered once per moment and each scheme quantizes them all in one call; rank-1
adds two reductions (row and column maxima) of each matrix's v. The relative error on v is an L2
error: it is dominated by v's large entries and understates what a zero does to 1/√v.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from optiscope.kernels.launch import local
from optiscope.monitor.metrics import Col
from optiscope.monitor.probes_flat import ProbeLayout, flat_values, takes
from optiscope.monitor.statewatch import StateWatch

__all__ = ["BLOCK8", "BLOCK4", "dynamic_map", "LINEAR4", "LINEAR4_NO_ZERO", "quantize_blockwise",
           "stored_values_at", "is_compressed", "moment_keys", "decoded_state",
           "Bitsandbytes8bitState", "CompressionProbes"]

BLOCK8 = 256  # bitsandbytes' and torchao's 8-bit block
BLOCK4 = 128  # torchao's AdamW4bit and Li et al.'s block
LINEAR4 = tuple(k / 15 for k in range(16))  # linear code with a zero
LINEAR4_NO_ZERO = tuple((k + 1) / 16 for k in range(16))  # torchao's unsigned 4-bit code

PROBE_COLS = (Col.PROBE_INT8_M_SQ, Col.PROBE_INT4_M_SQ, Col.PROBE_M_REF_SQ, Col.PROBE_INT8_V_SQ,
              Col.PROBE_INT4_V_SQ, Col.PROBE_INT4_V_RANK1_SQ, Col.PROBE_V_REF_SQ)
REQUANT_COLS = (Col.M_REQUANT_ERR_SQ, Col.M_REQUANT_REF_SQ, Col.V_REQUANT_ERR_SQ,
                Col.V_REQUANT_REF_SQ)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
                ) -> list[float]:
    """The dynamic (tree) quantization code of bitsandbytes' ``create_dynamic_map``, without its
    zero padding (as torchao uses it, so that it also gives the 4-bit code): per exponent 10^−e,
    a linear run of fractions, plus 0 and 1; sorted, 2^total_bits values."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                 else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items)  # float32 arithmetic, as bitsandbytes
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + ((-scale * means).tolist() if signed else [])
    if additional > 0:
        bounds = torch.linspace(0.1, 1, additional + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist() + ((-scale * means).tolist() if signed else [])
    data += [0.0, 1.0]
    if len(data) != 2 ** total_bits:
        raise ValueError(f"dynamic_map: {len(data)} values for {total_bits} bits "
                         f"(max_exponent_bits={max_exponent_bits}, signed={signed})")
    return sorted(data)


def quantize_blockwise(x: Tensor, code: Tensor, scale: Tensor) -> Tensor:
    """``x`` ([rows, B]) coded with ``code`` (sorted, on x's device and dtype) after dividing
    each row by ``scale`` ([rows, 1] or x's shape), returned dequantized. Rounds to the nearest
    code value, a tie upwards (torchao's rule); a row scale of 0 keeps zeros."""
    mids = (code[1:] + code[:-1]) / 2
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    index = torch.bucketize(x / safe, mids, right=True)
    return code[index] * scale


def _absmax_error_sq(blocks: Tensor, block: int, code: Tensor) -> Tensor:
    """Σ(x − Q(x))² per row of ``blocks`` ([rows, k·block]) under absmax per ``block``."""
    x = blocks.reshape(-1, block)
    q = quantize_blockwise(x, code, x.abs().amax(dim=1, keepdim=True))
    return (x - q).square_().reshape(blocks.shape[0], -1).sum(dim=1)


def is_compressed(t) -> bool:
    """State stored in fewer bits than float32: a tensor subclass (torchao's codes behind a
    float32 face), uint8 codes (bitsandbytes), or a bf16/fp16/fp8 tensor."""
    t = local(t)
    if type(t) not in (Tensor, torch.nn.Parameter):
        return True
    return t.dtype == torch.uint8 or (t.is_floating_point() and t.element_size() < 4)


def moment_keys(state: dict) -> tuple[str, str] | None:
    """(m key, v key) of an Adam-family state: torch's and torchao's, or bitsandbytes'."""
    for keys in (("exp_avg", "exp_avg_sq"), ("state1", "state2")):
        if all(isinstance(state.get(k), Tensor) for k in keys):
            return keys
    return None


def _pick(x: Tensor, index: Tensor | None) -> Tensor:
    flat = x.detach().reshape(-1)
    return flat if index is None else torch.index_select(flat, 0, index)


def _per_block(values: Tensor, scale: Tensor, block: int, index: Tensor | None) -> Tensor:
    """``values`` (at ``index``, None: all) times the scale of the block each is in."""
    scale = scale.detach().reshape(-1).double()
    if index is None:
        return (values.view(-1, block) * scale[:, None]).reshape(-1)
    return values * torch.index_select(scale, 0, torch.div(index, block, rounding_mode="floor"))


def stored_values_at(state: dict, key: str, index: Tensor | None) -> Tensor:
    """The values a state moment holds at flat coordinates ``index`` (None: all), float64,
    decoded from the stored codes and scales without dequantizing the whole tensor:
    bitsandbytes' (``qmap1``/``absmax1`` beside ``state1``), torchao's OptimState8bit/4bit
    (codes, a block scale, a code table; 4-bit packed two a byte, high nibble first) and
    OptimStateFp8; any other subclass through its ``dequantize()``."""
    t = local(state[key])
    n = t.numel()
    index = None if index is None else index.to(torch.int64)
    plain = type(t) in (Tensor, torch.nn.Parameter)
    if plain and t.dtype == torch.uint8 and key[-1:].isdigit() and f"qmap{key[-1]}" in state:
        qmap, absmax = state[f"qmap{key[-1]}"].double(), local(state[f"absmax{key[-1]}"])
        block = 1 << max(0, math.ceil(n / absmax.numel()) - 1).bit_length()
        values = qmap[_pick(t, index).long()]
        if index is None and n % block:  # a partial last block
            index = torch.arange(n, device=t.device)
        return _per_block(values, absmax, block, index)
    if plain:
        return _pick(t, index).double()
    codes, scale = getattr(t, "codes", None), getattr(t, "scale", None)
    block = getattr(t, "block_size", None)
    if isinstance(codes, Tensor) and isinstance(scale, Tensor) and isinstance(block, int):
        qmap = getattr(t, "qmap", None)
        if qmap is None:  # fp8 codes
            values = _pick(codes, index).double()
        elif codes.numel() * 2 == n:  # 4-bit, two codes a byte
            if index is None:
                byte = codes.reshape(-1)
                nibbles = torch.stack([byte >> 4, byte & 0xF], dim=-1).reshape(-1)
            else:
                byte = _pick(codes, torch.div(index, 2, rounding_mode="floor"))
                nibbles = torch.where(index % 2 == 0, byte >> 4, byte & 0xF)
            values = qmap.double()[nibbles.long()]
        else:
            values = qmap.double()[_pick(codes, index).long()]
        return _per_block(values, scale, block, index)
    return _pick(t.dequantize(), index).double()


class Bitsandbytes8bitState(Tensor):
    """bitsandbytes' blockwise 8-bit moment (uint8 codes, its ``qmap`` code table and
    ``absmax`` block scales, three entries of the state) as one float32-faced tensor with a
    ``dequantize()``: what `decoded_state` hands the monitor, which reads compressed state
    through ``dequantize()`` only. No aten op but detach is implemented."""

    @staticmethod
    def __new__(cls, codes: Tensor, qmap: Tensor, absmax: Tensor):
        return Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32,
                                             device=codes.device)

    def __init__(self, codes: Tensor, qmap: Tensor, absmax: Tensor):
        self.codes, self.qmap, self.absmax = codes, qmap, absmax

    def __tensor_flatten__(self):
        return ["codes", "qmap", "absmax"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return args[0]
        raise NotImplementedError(f"{cls.__name__} does not implement {func}")

    def dequantize(self) -> Tensor:
        state = {"state1": self.codes, "qmap1": self.qmap, "absmax1": self.absmax}
        return stored_values_at(state, "state1", None).float().view(self.shape)


def decoded_state(state: dict) -> dict:
    """``state`` with bitsandbytes' 8-bit moments (``state1``/``state2`` as uint8 codes beside
    ``qmap1``/``absmax1`` ...) wrapped as `Bitsandbytes8bitState`; any other state as it is."""
    wrapped = {}
    for key in ("state1", "state2"):
        t, n = state.get(key), key[-1]
        if (isinstance(t, Tensor) and t.dtype == torch.uint8
                and isinstance(state.get(f"qmap{n}"), Tensor)
                and isinstance(state.get(f"absmax{n}"), Tensor)):
            wrapped[key] = Bitsandbytes8bitState(local(t), state[f"qmap{n}"],
                                                 local(state[f"absmax{n}"]))
    return {**state, **wrapped} if wrapped else state


def _decoupled(optimizer, group: dict) -> bool:
    """Whether weight decay stays out of the moments: AdamW's decay (torch's and optiscope's
    ``decoupled_weight_decay``, torchao's ``is_adamw``), and every bitsandbytes Adam (its
    kernels scale θ by 1 − lr·λ for Adam8bit too)."""
    if "decoupled_weight_decay" in group:
        return bool(group["decoupled_weight_decay"])
    if hasattr(optimizer, "is_adamw"):
        return bool(optimizer.is_adamw)
    return (type(optimizer).__module__.startswith("bitsandbytes")
            or "AdamW" in type(optimizer).__name__)


class CompressionProbes:
    """The requantization error and the probes of one `Collector`.

    Args:
        collector: the collector whose slots, samples and blocks it reads.
        probes: run the int8/int4 probes on uncompressed moments (the requantization error of a
            compressed state is always measured).
    """

    def __init__(self, collector, *, probes: bool = True):
        self.collector = collector
        self.probes = probes
        self._blocks: dict[int, Tensor | None] = {}  # slot -> 256-entry blocks probed
        # its own draws leave the collector's sequence of samples as it was
        self.generator = torch.Generator().manual_seed(collector.generator.initial_seed() + 1)
        self._pending: list[tuple[int, tuple[str, str], Tensor, Tensor, Tensor, float, float]] = []
        self.codes: dict[tuple, Tensor] = {}
        self._layouts: dict[tuple, ProbeLayout] = {}  # the small tensors' blocks (probes_flat)
        # the active tensors whose moments are compressed, while the state's tensors stay
        self._watch = StateWatch()
        self._compressed: tuple[tuple, list[tuple[int, tuple[str, str]]]] = ((), [])
        # The monitor's word, when it has one, that the state's tensors are those it saw after
        # the last step (its sampled post-hook looked): a version to compare instead of looking.
        self.state_version: Callable[[], int | None] | None = None
        self._version: int | None = None  # the version the cache was made at (None: the watch)

    def _compressed_moments(self) -> list[tuple[int, tuple[str, str]]]:
        """(active tensor, its moment keys) of the tensors whose m or v is compressed: looked
        up again when the active tensors or the state's tensors change (`StateWatch`)."""
        c = self.collector
        active = tuple(c.active)
        version = self.state_version() if self.state_version is not None else None
        if version is not None:
            changed = version != self._version
            if changed:  # its last look is not the state the cache is about to hold
                self._watch.reset()
        else:
            changed = self._watch.changed(c.optimizer.state)
        if changed or self._compressed[0] != active:
            found = []
            for i in active:
                state = c.optimizer.state.get(c.slots[i].param)
                keys = moment_keys(state) if state else None
                if keys is not None and (is_compressed(state[keys[0]])
                                         or is_compressed(state[keys[1]])):
                    found.append((i, keys))
            self._compressed, self._version = (active, found), version
        return self._compressed[1]

    # ------------------------------------------------------------------ requantization error
    def begin(self, grad_scale: Tensor | None) -> None:
        """Before the step: m, v and the g the update will see, at the coordinate sample of
        each tensor whose moments are compressed and already exist."""
        c = self.collector
        self._pending = []
        compressed = self._compressed_moments()
        if not compressed:
            return
        groups = {id(p): g for g in c.optimizer.param_groups for p in g["params"]}
        for i, keys in compressed:
            slot = c.slots[i]
            state = c.optimizer.state[slot.param]
            group = groups.get(id(slot.param), {})
            betas = group.get("betas")
            if not isinstance(betas, (tuple, list)) or len(betas) < 2:
                continue
            index = slot.sample.index
            grad = local(slot.param.grad).detach().reshape(-1)
            g = (grad if index is None else grad[index.to(torch.int64)]).double()
            if grad_scale is not None:
                g = g / grad_scale.detach().double().reshape(())
            if group.get("maximize"):
                g = -g
            decay = group.get("weight_decay") or 0.0
            if decay and not _decoupled(c.optimizer, group):
                g = g + decay * slot.sample.take(local(slot.param)).double()
            self._pending.append((i, keys, stored_values_at(state, keys[0], index),
                                  stored_values_at(state, keys[1], index), g,
                                  float(betas[0]), float(betas[1])))

    def _requant(self, columns: dict[Col, Tensor], position: dict[int, int], device) -> None:
        """The stored moments after the step against the exact step from those before: the
        tensors' samples concatenated, one computation and one reduction per column."""
        c = self.collector
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        after = [[], []]
        for i, keys, *_ in pending:
            state, index = c.optimizer.state[c.slots[i].param], c.slots[i].sample.index
            for out, key in zip(after, keys):
                out.append(stored_values_at(state, key, index))
        m0, v0, g = (torch.cat([item[k] for item in pending]) for k in (2, 3, 4))
        lengths = torch.tensor([item[2].numel() for item in pending], device=g.device)
        beta1, beta2 = (torch.tensor([item[k] for item in pending], dtype=torch.float64,
                                     device=g.device).repeat_interleave(lengths) for k in (5, 6))
        m_ref = beta1 * m0 + (1 - beta1) * g
        v_ref = beta2 * v0 + (1 - beta2) * g * g
        scale = torch.tensor([c.slots[item[0]].sample.scale for item in pending],
                             dtype=torch.float64, device=g.device)
        where = torch.tensor([position[item[0]] for item in pending], device=device)
        for col, x in ((Col.M_REQUANT_ERR_SQ, torch.cat(after[0]) - m_ref),
                       (Col.M_REQUANT_REF_SQ, m_ref),
                       (Col.V_REQUANT_ERR_SQ, torch.cat(after[1]) - v_ref),
                       (Col.V_REQUANT_REF_SQ, v_ref)):
            total = torch.segment_reduce(x.square(), "sum", lengths=lengths) * scale
            columns.setdefault(col, self._nan(len(position), device))[where] = total.to(device)

    # ------------------------------------------------------------------------------ probes
    def _block_index(self, slot) -> Tensor | None:
        """Indices of the 256-entry blocks to probe of ``slot``'s tensor; None: all of them."""
        key = id(slot)
        if key in self._blocks:  # fixed, as the samples are
            return self._blocks[key]
        c = self.collector
        n256 = local(slot.param).numel() // BLOCK8
        if c.topk_density is not None and c.topk_block % BLOCK8 == 0:
            index = None
            if slot.blocks is not None:
                per = c.topk_block // BLOCK8
                inner = torch.arange(per, device=slot.blocks.device)
                index = (slot.blocks.to(torch.int64)[:, None] * per + inner).reshape(-1)
        else:
            wanted = math.ceil(slot.sample.count / BLOCK8)
            index = (None if n256 <= wanted else torch.randperm(
                n256, generator=self.generator)[:wanted].sort().values.to(local(slot.param).device))
        self._blocks[key] = index
        return index

    def _code(self, name: str, device, dtype) -> Tensor:
        key = (name, str(device), dtype)
        if key not in self.codes:
            values = {"dyn8s": lambda: dynamic_map(True), "dyn8u": lambda: dynamic_map(False),
                      "dyn4s": lambda: dynamic_map(True, 3, 4), "lin4": lambda: LINEAR4,
                      "lin4nz": lambda: LINEAR4_NO_ZERO}[name]()
            self.codes[key] = torch.tensor(values, dtype=dtype, device=device)
        return self.codes[key]

    def _probe(self, columns: dict[Col, Tensor], position: dict[int, int], device) -> None:
        c = self.collector
        m_rows, v_rows = [], []  # (row, slot, probed block index or None, the moment)
        for i in c.active:
            slot = c.slots[i]
            state = c.optimizer.state.get(slot.param)
            keys = moment_keys(state) if state else None
            if keys is None:
                continue
            p = local(slot.param)
            if p.numel() // BLOCK8 == 0:
                continue
            index = self._block_index(slot)
            for key, out in ((keys[0], m_rows), (keys[1], v_rows)):
                t = local(state[key])
                if (is_compressed(t) or not t.is_floating_point() or t.numel() != p.numel()):
                    continue
                out.append((position[i], slot, index, t))
        for rows, kind in ((m_rows, "m"), (v_rows, "v")):
            # small tensors laid end to end (probes_flat), the others one by one
            small = [r for r in rows if takes(r[3])]
            large = [r for r in rows if not takes(r[3])]
            if len(small) > 1:
                tensors = [t for *_, t in small]
                layout = self._layouts.get((kind, tuple(id(r[1]) for r in small)))
                if layout is None or not layout.fits(tensors):
                    layout = ProbeLayout(tensors, [r[2] for r in small], BLOCK8, tensors[0].device)
                    self._layouts[(kind, tuple(id(r[1]) for r in small))] = layout
                flat = flat_values(tensors)
                x = layout.blocks(flat)
                norm = layout.rank1(flat) if kind == "v" else None
                self._probe_columns(columns, position, device, small, layout.counts, x, norm, kind)
            else:
                large = small + large
            if large:
                blocks = []
                for _, slot, index, t in large:
                    n256 = t.numel() // BLOCK8
                    full = t.detach().reshape(-1)[: n256 * BLOCK8].view(n256, BLOCK8)
                    blocks.append(full if index is None else torch.index_select(full, 0, index))
                x = torch.cat(blocks).to(torch.float64)
                norm = (self._rank1([(r, s, b, i, t) for (r, s, i, t), b in zip(large, blocks)],
                                    x.device, torch.float64) if kind == "v" else None)
                self._probe_columns(columns, position, device, large,
                                    [b.shape[0] for b in blocks], x, norm, kind)

    def _probe_columns(self, columns, position, device, rows, counts, x, norm, kind) -> None:
        """The probes' sums of the blocks ``x`` ([Σ counts, 256] float64) of the tensors
        ``rows``, per tensor scaled to all its blocks, into ``columns``; ``norm``: v's rank-1
        normaliser of each entry (None for m)."""
        wide = torch.float64
        lengths = torch.tensor(counts, device=x.device)
        scale = torch.tensor([local(s.param).numel() // BLOCK8 / n for (_, s, _, _), n
                              in zip(rows, counts)], dtype=wide, device=x.device)
        where = torch.tensor([r[0] for r in rows], device=device)

        def put(col, per_row):
            total = torch.segment_reduce(per_row, "sum", lengths=lengths) * scale
            columns.setdefault(col, self._nan(len(position), device))[where] = total.to(device)

        if kind == "m":
            put(Col.PROBE_M_REF_SQ, x.square().sum(dim=1))
            put(Col.PROBE_INT8_M_SQ, _absmax_error_sq(x, BLOCK8, self._code("dyn8s", x.device, wide)))
            put(Col.PROBE_INT4_M_SQ, _absmax_error_sq(x, BLOCK4, self._code("dyn4s", x.device, wide)))
        else:
            put(Col.PROBE_V_REF_SQ, x.square().sum(dim=1))
            put(Col.PROBE_INT8_V_SQ, _absmax_error_sq(x, BLOCK8, self._code("dyn8u", x.device, wide)))
            put(Col.PROBE_INT4_V_SQ, _absmax_error_sq(x, BLOCK4, self._code("lin4", x.device, wide)))
            q = quantize_blockwise(x, self._code("lin4nz", x.device, wide), norm.reshape(x.shape))
            put(Col.PROBE_INT4_V_RANK1_SQ, (x - q).square_().sum(dim=1))

    def buffers(self) -> list[Tensor]:
        """What the probes keep between steps (the flat layouts' index tensors)."""
        return [t for layout in self._layouts.values() for t in layout.buffers()]

    @staticmethod
    def _rank1(rows, device, wide) -> Tensor:
        """min(row max, column max) of every probed entry ([blocks, 256]): the row and column
        maxima of each tensor concatenated, and one gather for all blocks."""
        r_parts, c_parts, firsts = [], [], []
        per_block: list[list[int]] = [[], [], [], []]  # columns, row offset, column offset, 2-D
        for _, _, blocks, index, t in rows:
            v = t.detach()
            matrix = v.dim() >= 2
            mat = v.reshape(v.shape[0], -1) if matrix else v.reshape(1, -1)
            offsets = (sum(x.numel() for x in r_parts), sum(x.numel() for x in c_parts))
            if matrix:
                r_parts.append(mat.amax(dim=1))
                c_parts.append(mat.amax(dim=0))
            else:  # a vector: its maximum for every entry
                r_parts.append(mat.amax().reshape(1))
                c_parts.append(r_parts[-1])
            firsts.append(torch.arange(blocks.shape[0], device=device) if index is None
                          else index.to(device, torch.int64))
            for column, value in zip(per_block, (mat.shape[1], *offsets, int(matrix))):
                column += [value] * blocks.shape[0]
        n_cols, r0, c0, matrix = (torch.tensor(x, device=device)[:, None] for x in per_block)
        flat = torch.cat(firsts)[:, None] * BLOCK8 + torch.arange(BLOCK8, device=device)
        row = torch.div(flat, n_cols, rounding_mode="floor")
        r_all, c_all = torch.cat(r_parts).to(wide), torch.cat(c_parts).to(wide)
        return torch.minimum(r_all[row * matrix + r0], c_all[(flat - row * n_cols) * matrix + c0])

    def skip_reasons(self, rows, cls: str) -> dict[str, str]:
        """Why this optimizer has none of these metrics, judged after its first sampled step
        (``rows``: that step's host sums), when its state exists."""
        def none(col) -> bool:
            return bool(np.isnan(rows[:, col]).all())

        reasons = {}
        states = [s for s in self.collector.optimizer.state.values() if moment_keys(s)]
        if none(Col.M_REQUANT_ERR_SQ) and not any(
                is_compressed(s[k]) for s in states for k in moment_keys(s)):
            why = (f"{cls} keeps no compressed Adam moments (exp_avg/exp_avg_sq or "
                   "bitsandbytes' state1/state2 in fewer bits than float32): nothing requantizes")
            reasons["moment1_quant_error"] = reasons["moment2_quant_error"] = why
        names = ("probe_int8_m", "probe_int4_m", "probe_int8_v", "probe_int4_v",
                 "probe_int4_v_rank1")
        if not self.probes:
            reasons.update(dict.fromkeys(names, "off: quant_probes=False"))
        elif none(Col.PROBE_M_REF_SQ) and none(Col.PROBE_V_REF_SQ):
            reasons.update(dict.fromkeys(names, (
                f"{cls} keeps no uncompressed Adam moments (exp_avg, exp_avg_sq) of a tensor "
                f"of {BLOCK8} entries or more")))
        return reasons

    # ------------------------------------------------------------------------------ the step
    @staticmethod
    def _nan(n: int, device) -> Tensor:
        return torch.full((n,), math.nan, dtype=torch.float64, device=device)

    def end(self) -> dict[Col, Tensor]:
        """After the step: this step's columns, one value per active tensor (NaN: none)."""
        c = self.collector
        if not c.active or not (self._pending or self.probes):
            return {}
        device = local(c.slots[c.active[0]].param).device
        position = {i: k for k, i in enumerate(c.active)}
        columns: dict[Col, Tensor] = {}
        self._requant(columns, position, device)
        if self.probes:
            self._probe(columns, position, device)
        return columns
