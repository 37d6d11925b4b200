"""Group quantisation of a form's stored float tensors (int8 / int4 / 2-, 3-bit codes), bit
packing, dequantisation and fake quantisation for distillation (the rate–distortion search that
chooses bits lives in :mod:`adaptzip.qsearch`).

Why this module is longer than ~500 lines: it is the byte-level codec of formats/quantization.md
(row layout, codes, packing, encode/decode and their checks), kept in one place so that the
writer and every reader share one definition of the format.

Layout (the full spec is formats/quantization.md). A float tensor ``T`` of any shape is seen in
*row layout*: its group axis ``a`` moved last and the rest flattened, ``X = T.movedim(a, -1)
.reshape(R, n)``. Each row is cut into ``ceil(n / G)`` groups of ``G`` consecutive values (the last
one may be shorter); each group has one fp16 scale (and, asymmetric, one fp16 zero point). A row
is stored at ``bits[r]`` ∈ {2, 3, 4, 8} bits per value, or at the container's float width (16/32:
the raw float bits, no scale). Stored tensors, beside nothing else of ``T``:

* ``T.q``     — I8 ``(R, n)`` when every row is 8-bit; else U8 ``(ceil(Σ_r bits[r]·n / 8),)``: the
  rows' codes in row order, each code LSB-first in a little-endian bit stream;
* ``T.scale`` — F16 ``(R_q, ceil(n/G))``, R_q = rows stored as codes (in row order);
* ``T.zero``  — F16 ``(R_z, ceil(n/G))`` when asymmetric, R_z = rows with bits < 8.

Dequantisation, in fp32 and nothing else (so every reader gets the same bits): 8-bit codes are
two's complement ``q ∈ [−127, 127]``, ``x̂ = q · s``; b < 8 bits are unsigned ``u ∈ [0, 2^b − 1]``,
``x̂ = (u − z) · s`` with ``z = (2^b − 1)/2`` (symmetric) or the stored zero point.

Why rows: for the factors of a low-rank update (A: r×in, B: out×r) the group axis is the long
one (``in`` for A, ``out`` for B), so each rank direction — a row of A, a column of B — owns its
scales. Quantisation then commutes with the diagonal gauge ``B A = (B D)(D⁻¹ A)``, each
direction's error is independent of the others' (the basis of per-direction bit allocation),
and a direction can be dropped or stored at its own bit width.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .runtime import single_thread

Tensor = torch.Tensor

SCHEMES = ("none", "int8", "int4", "int4-asym", "auto")
CODE_BITS = (2, 3, 4, 8)  # integer code widths a row can use
AUTO_LEVELS = (2, 3, 4, 8)  # code widths `auto` considers (plus the container float width)
DEFAULT_GROUP = 64
CLIP_BITS = 4  # symmetric rows at ≤ this many bits search a clipping ratio (least group error)
_CLIPS = tuple(1.0 - 0.05 * i for i in range(10))  # 1.00 … 0.55
_FP16_MAX = 65504.0
_CHUNK = 1 << 22  # values per packing chunk (a multiple of 8: chunks end on byte boundaries)


class QuantError(ValueError):
    """A quantisation spec that does not fit its tensor (callers wrap it with a path)."""


def float_bits(dtype: torch.dtype) -> int:
    """Bits of one value of a float dtype (16 for fp16/bf16, 32 for fp32)."""
    return 8 * torch.empty(0, dtype=dtype).element_size()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class TensorQuant:
    """How one logical float tensor is stored: ``bits`` (one width for every row, or one per row
    of the row layout), the group ``axis`` of the logical tensor, ``group_size`` and whether rows
    below 8 bits carry zero points (asymmetric)."""

    bits: int | tuple[int, ...]
    axis: int
    group_size: int = DEFAULT_GROUP
    zero: bool = False

    def row_bits(self, rows: int) -> list[int]:
        return [int(self.bits)] * rows if isinstance(self.bits, int) else [int(b) for b in self.bits]

    def to_json(self) -> dict:
        return {
            "bits": self.bits if isinstance(self.bits, int) else list(self.bits),
            "axis": self.axis,
            "group_size": self.group_size,
            "zero": self.zero,
        }

    @classmethod
    def from_json(cls, d: dict) -> TensorQuant:
        b = d["bits"]
        return cls(
            int(b) if isinstance(b, int) else tuple(int(x) for x in b),
            int(d["axis"]),
            int(d["group_size"]),
            bool(d.get("zero", False)),
        )


@dataclass
class Storage:
    """The manifest's ``storage`` section: the user's scheme, the default group size, one
    :class:`TensorQuant` per quantised tensor (tensors not listed are stored plainly) and, for
    ``auto``, the bit allocation summary."""

    scheme: str
    group_size: int
    tensors: dict[str, TensorQuant]
    allocation: dict | None = None

    def to_json(self) -> dict:
        d = {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "tensors": {k: v.to_json() for k, v in sorted(self.tensors.items())},
        }
        if self.allocation is not None:
            d["allocation"] = self.allocation
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> Storage | None:
        if not d:
            return None
        return cls(
            d["scheme"],
            int(d["group_size"]),
            {k: TensorQuant.from_json(v) for k, v in d["tensors"].items()},
            d.get("allocation"),
        )


def group_axis(shape: Sequence[int]) -> int:
    """The default group axis: the longest dimension (the last on ties). For A (r×in) that is
    ``in``, for B (out×r) ``out``: each rank direction gets its own scales."""
    shape = list(shape)
    if not shape:
        return 0
    m = max(shape)
    return max(i for i, s in enumerate(shape) if s == m)


def row_shape(shape: Sequence[int], axis: int) -> tuple[int, int]:
    """(R, n) of the row layout of a tensor of ``shape`` grouped along ``axis``."""
    shape = [int(s) for s in shape] or [1]
    n = shape[axis]
    R = 1
    for i, s in enumerate(shape):
        if i != axis:
            R *= s
    return R, n


def to_rows(x: Tensor, axis: int) -> Tensor:
    """Row layout (R×n): the group axis moved last, the rest flattened (C order)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def from_rows(rows: Tensor, shape: Sequence[int], axis: int) -> Tensor:
    """Inverse of :func:`to_rows`."""
    shape = list(shape)
    if not shape:
        return rows.reshape(())
    moved = [s for i, s in enumerate(shape) if i != axis] + [shape[axis]]
    return rows.reshape(moved).movedim(-1, axis)


def check_spec(shape: Sequence[int], tq: TensorQuant, float_dtype: torch.dtype) -> None:
    """Raise :class:`QuantError` when ``tq`` cannot describe a tensor of ``shape``."""
    nd = max(len(shape), 1)
    if not 0 <= tq.axis < nd:
        raise QuantError(f"group axis {tq.axis} out of range for shape {list(shape)}")
    if tq.group_size < 1:
        raise QuantError(f"group size must be ≥ 1, got {tq.group_size}")
    R, n = row_shape(shape, tq.axis)
    bits = tq.row_bits(R)
    if len(bits) != R:
        raise QuantError(f"{len(bits)} row bit widths for {R} rows (shape {list(shape)}, axis {tq.axis})")
    fb = float_bits(float_dtype)
    bad = sorted({b for b in bits if b not in CODE_BITS and b != fb})
    if bad:
        raise QuantError(f"bit width {bad[0]} is not one of {', '.join(map(str, CODE_BITS))} or the container's {fb}")
    if not any(b in CODE_BITS for b in bits):
        raise QuantError("no row is quantised (store the tensor plainly instead)")


# ----------------------------------------------------------------------------- scales
def _fp16_up(s: Tensor) -> Tensor:
    """The smallest fp16 value ≥ s (s ≥ 0, fp32): scales never shrink, so no code overflows."""
    if bool((s > _FP16_MAX).any()):
        raise QuantError(f"a group's scale {float(s.max()):.4g} exceeds the fp16 range (values too large to quantise)")
    h = s.to(torch.float16)
    low = h.float() < s
    if bool(low.any()):
        h = torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)
    return h


def _safe(s: Tensor) -> Tensor:
    sf = s.float()
    return torch.where(sf > 0, sf, torch.ones_like(sf))


@dataclass
class Codes:
    """Quantised rows: ``codes`` (R×n; int8 for 8 bits, uint8 below), ``scale`` (R×ng fp16),
    ``zero`` (R×ng fp16 or None)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group_size: int


@single_thread()
def quantize_rows(X: Tensor, bits: int, group_size: int, zero: bool = False) -> Codes:
    """Quantise rows X (R×n) at ``bits`` with one scale per group of ``group_size``.

    8 bits: symmetric midtread, s = max|x|/127 (rounded up to fp16), q = round(x/s) ∈ [−127, 127].
    b < 8, symmetric: midrise, z = (2^b−1)/2, s = c·max|x|/z, u = clamp(round(x/s + z), 0, 2^b−1),
    c ∈ {1, 0.95, …, 0.55} the clipping ratio of least squared error in the group.
    b < 8, asymmetric: lo = min(x, 0), hi = max(x, 0), s = (hi − lo)/(2^b − 1), z = fp16(−lo/s).
    Error bound, s the stored scale: |x − x̂| ≤ s/2 for every value inside the group's range
    (all values when c = 1, 8-bit and asymmetric); a clipped value (|x| > z·s) has error |x| − z·s."""
    if bits not in CODE_BITS:
        raise QuantError(f"bits must be one of {CODE_BITS}, got {bits}")
    X = X.detach().float()
    R, n = X.shape
    G = int(group_size)
    ng = max(1, _ceil_div(n, G))
    Xp = torch.nn.functional.pad(X, (0, ng * G - n)).view(R, ng, G)  # R×ng×G, zero-padded
    if bits == 8:
        s = _fp16_up(Xp.abs().amax(-1) / 127.0) if n else torch.zeros(R, ng, dtype=torch.float16)
        q = torch.round(Xp / _safe(s)[..., None]).clamp_(-127, 127)
        return Codes(q.view(R, ng * G)[:, :n].to(torch.int8), s, None, bits, G)
    L = (1 << bits) - 1
    if not zero and bits <= CLIP_BITS and R > 1 and R * ng * G * len(_CLIPS) > _CHUNK * 4:
        step = max(1, _CHUNK * 4 // (ng * G * len(_CLIPS)))  # bound the clip search's memory
        parts = [quantize_rows(X[i : i + step], bits, G) for i in range(0, R, step)]
        return Codes(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), None, bits, G)
    if zero:
        lo, hi = Xp.amin(-1).clamp(max=0), Xp.amax(-1).clamp(min=0)
        s = _fp16_up((hi - lo) / L)
        z = (-lo / _safe(s)).clamp(0, L).to(torch.float16)
        u = torch.round(Xp / _safe(s)[..., None] + z.float()[..., None]).clamp_(0, L)
        return Codes(u.view(R, ng * G)[:, :n].to(torch.uint8), s, z, bits, G)
    zc = L / 2
    amax = Xp.abs().amax(-1)  # R×ng
    if bits <= CLIP_BITS and n:
        # all clipping ratios at once: C×R×ng scales, the least squared error per group wins (first on ties)
        clips = torch.tensor(_CLIPS, dtype=torch.float32)[:, None, None]
        sc = _fp16_up(amax[None] * clips / zc)  # C×R×ng
        scf = sc.float()[..., None]
        xh = (torch.round(Xp[None] / torch.where(scf > 0, scf, 1.0) + zc).clamp_(0, L) - zc) * scf
        err = (Xp[None] - xh).square_()
        if ng * G != n:
            err[..., -1, n - (ng - 1) * G :] = 0  # padding values do not count
        best = err.sum(-1).argmin(0)  # R×ng
        s = sc.gather(0, best[None]).squeeze(0)
    else:
        s = _fp16_up(amax / zc)
    u = torch.round(Xp / _safe(s)[..., None] + zc).clamp_(0, L)
    return Codes(u.view(R, ng * G)[:, :n].to(torch.uint8), s, None, bits, G)


@single_thread()
def dequantize_rows(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int) -> Tensor:
    """x̂ (R×n, fp32) = q·s (8 bits) or (u − z)·s (b < 8), each group's s/z repeated over its values."""
    R, n = codes.shape
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :n]
    if bits == 8:
        return codes.float() * s
    if zero is None:
        return (codes.float() - ((1 << bits) - 1) / 2) * s
    return (codes.float() - zero.float().repeat_interleave(group_size, dim=1)[:, :n]) * s


@single_thread()
def roundtrip(x: Tensor, tq: TensorQuant, float_dtype: torch.dtype = torch.float16) -> Tensor:
    """dequantize(quantize(x)) as stored under ``tq`` (fp32, same shape; no packing)."""
    shape = tuple(x.shape)
    check_spec(shape, tq, float_dtype)
    rows = to_rows(x.detach().float(), tq.axis)
    R, n = rows.shape
    out = torch.empty_like(rows)
    bits = tq.row_bits(R)
    for b in sorted(set(bits)):
        idx = torch.tensor([r for r in range(R) if bits[r] == b], dtype=torch.long)
        sub = rows[idx]
        if b in CODE_BITS:
            c = quantize_rows(sub, b, tq.group_size, zero=tq.zero and b < 8)
            out[idx] = dequantize_rows(c.codes, c.scale, c.zero, b, tq.group_size)
        else:
            out[idx] = sub.to(float_dtype).float()
    return from_rows(out, shape, tq.axis)


# ----------------------------------------------------------------------------- packing
_W8 = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _to_bits(codes: Tensor, bits: int) -> Tensor:
    """codes (N,) non-negative ints < 2^bits → their bits LSB first, (N·bits,) uint8."""
    c = codes.to(torch.int64)
    return ((c[:, None] >> torch.arange(bits)) & 1).to(torch.uint8).reshape(-1)


def _from_bits(bitv: Tensor, bits: int) -> Tensor:
    """(N·bits,) uint8 bits → (N,) int64 codes (trailing bits short of a code are ignored)."""
    bitv = bitv[: bitv.numel() - bitv.numel() % bits]
    return (bitv.view(-1, bits).to(torch.int64) << torch.arange(bits)).sum(1)


def _bits_to_bytes(bitv: Tensor) -> Tensor:
    pad = -bitv.numel() % 8
    if pad:
        bitv = torch.cat([bitv, bitv.new_zeros(pad)])
    return (bitv.view(-1, 8) * _W8).sum(1, dtype=torch.uint8) if bitv.numel() else bitv.new_zeros(0)


def _bytes_to_bits(buf: Tensor) -> Tensor:
    return ((buf.to(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)


@single_thread()
def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack codes (N,) in [0, 2^bits) into ceil(N·bits/8) bytes: code i occupies stream bits
    [i·bits, (i+1)·bits), least significant first; stream bit t is bit t mod 8 of byte t div 8;
    unused high bits of the last byte are 0. (4 bits: byte j = c[2j] | c[2j+1] << 4.)"""
    codes = codes.reshape(-1)
    N = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if bits == 4:
        c = codes.to(torch.uint8)
        if N % 2:
            c = torch.cat([c, c.new_zeros(1)])
        c = c.view(-1, 2)
        return c[:, 0] | (c[:, 1] << 4)
    if bits == 2:
        c = codes.to(torch.uint8)
        if N % 4:
            c = torch.cat([c, c.new_zeros(4 - N % 4)])
        c = c.view(-1, 4)
        return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)
    out = [_bits_to_bytes(_to_bits(codes[i : i + _CHUNK], bits)) for i in range(0, N, _CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


@single_thread()
def unpack_bits(buf: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes (int64) of a packed stream."""
    buf = buf.reshape(-1).to(torch.uint8)
    if bits == 8:
        return buf[:count].to(torch.int64)
    if bits == 4:
        return torch.stack([buf & 15, buf >> 4], 1).reshape(-1)[:count].to(torch.int64)
    if bits == 2:
        return torch.stack([(buf >> (2 * j)) & 3 for j in range(4)], 1).reshape(-1)[:count].to(torch.int64)
    per = _CHUNK * bits // 8  # bytes per chunk of codes
    out = [_from_bits(_bytes_to_bits(buf[i : i + per]), bits) for i in range(0, buf.numel(), per)]
    codes = torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
    return codes[:count]


# ----------------------------------------------------------------------------- tensors
def stored_specs(
    name: str, shape: Sequence[int], tq: TensorQuant, float_dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Exact stored names, shapes and dtypes of logical tensor ``name`` under ``tq``."""
    check_spec(shape, tq, float_dtype)
    R, n = row_shape(shape, tq.axis)
    bits = tq.row_bits(R)
    ng = max(1, _ceil_div(n, tq.group_size))
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if all(b == 8 for b in bits):
        specs[f"{name}.q"] = ((R, n), torch.int8)
    else:
        specs[f"{name}.q"] = ((_ceil_div(sum(bits) * n, 8),), torch.uint8)
    n_q = sum(1 for b in bits if b in CODE_BITS)
    specs[f"{name}.scale"] = ((n_q, ng), torch.float16)
    n_z = sum(1 for b in bits if b < 8) if tq.zero else 0
    if n_z:
        specs[f"{name}.zero"] = ((n_z, ng), torch.float16)
    return specs


def stored_bytes(shape: Sequence[int], tq: TensorQuant | None, float_dtype: torch.dtype) -> int:
    """Payload bytes of a tensor: q + scale (+ zero) under ``tq``, or numel × float size when None.
    = ceil(Σ_r bits_r · n / 8) + 2·R_q·ceil(n/G) + 2·R_z·ceil(n/G)."""
    if tq is None:
        return math.prod(shape) * (float_bits(float_dtype) // 8)
    return sum(
        math.prod(s) * torch.empty(0, dtype=dt).element_size()
        for s, dt in stored_specs("t", shape, tq, float_dtype).values()
    )


def _raw_float_codes(rows: Tensor, float_dtype: torch.dtype) -> Tensor:
    """The container-dtype bit patterns of rows, as non-negative int64 (for the mixed stream)."""
    fb = float_bits(float_dtype)
    iv = rows.to(float_dtype).contiguous().view(torch.int16 if fb == 16 else torch.int32).to(torch.int64)
    return iv & ((1 << fb) - 1)


_ENCODED: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()
_ENCODED_MAX = 4096  # tensors remembered (a budget search re-encodes the same factors many times)


@single_thread()
def encode(name: str, x: Tensor, tq: TensorQuant, float_dtype: torch.dtype) -> dict[str, Tensor]:
    """The stored tensors of logical tensor ``name`` (``name.q``, ``name.scale`` [, ``name.zero``]).
    Deterministic; results are memoised by the tensor's bytes and the spec."""
    xc = x.detach().cpu().contiguous()
    key = (
        name,
        tuple(xc.shape),
        str(xc.dtype),
        tq,
        str(float_dtype),
        hashlib.sha1(memoryview(xc.reshape(-1).view(torch.uint8).numpy())).hexdigest() if xc.numel() else "",
    )
    hit = _ENCODED.get(key)
    if hit is not None:
        _ENCODED.move_to_end(key)
        return dict(hit)
    out = _encode(name, xc, tq, float_dtype)
    _ENCODED[key] = out
    if len(_ENCODED) > _ENCODED_MAX:
        _ENCODED.popitem(last=False)
    return dict(out)


def _encode(name: str, x: Tensor, tq: TensorQuant, float_dtype: torch.dtype) -> dict[str, Tensor]:
    shape = tuple(x.shape)
    check_spec(shape, tq, float_dtype)
    rows = to_rows(x.detach().cpu().float(), tq.axis)
    R, n = rows.shape
    bits = tq.row_bits(R)
    G = tq.group_size
    ng = max(1, _ceil_div(n, G))
    fb = float_bits(float_dtype)
    if len(set(bits)) == 1:  # uniform: one quantisation, no per-row work
        b = bits[0]
        c = quantize_rows(rows, b, G, zero=tq.zero and b < 8)
        out = {
            f"{name}.q": c.codes.contiguous() if b == 8 else pack_bits(c.codes.reshape(-1), b),
            f"{name}.scale": c.scale.contiguous(),
        }
        if c.zero is not None:
            out[f"{name}.zero"] = c.zero.contiguous()
        return out
    scale = torch.zeros(R, ng, dtype=torch.float16)
    zero = torch.zeros(R, ng, dtype=torch.float16)
    row_codes: list[Tensor | None] = [None] * R
    for b in sorted(set(bits)):
        idx = [r for r in range(R) if bits[r] == b]
        sub = rows[idx]
        if b == fb:
            codes = _raw_float_codes(sub, float_dtype)
        else:
            c = quantize_rows(sub, b, G, zero=tq.zero and b < 8)
            codes = c.codes.to(torch.int64) & 0xFF  # two's complement bytes for 8 bits
            scale[idx] = c.scale
            if c.zero is not None:
                zero[idx] = c.zero
        for j, r in enumerate(idx):
            row_codes[r] = codes[j]
    # the stream: runs of consecutive rows of equal width, each packed LSB first
    bitv, r = [], 0
    while r < R:
        e = r
        while e < R and bits[e] == bits[r]:
            e += 1
        bitv.append(_to_bits(torch.cat([row_codes[i] for i in range(r, e)]), bits[r]))  # type: ignore[misc]
        r = e
    out = {
        f"{name}.q": _bits_to_bytes(torch.cat(bitv)),
        f"{name}.scale": scale[[r for r in range(R) if bits[r] in CODE_BITS]].contiguous(),
    }
    if tq.zero and any(b < 8 for b in bits):
        out[f"{name}.zero"] = zero[[r for r in range(R) if bits[r] < 8]].contiguous()
    return out


@single_thread()
def decode(
    name: str, parts: dict[str, Tensor], tq: TensorQuant, shape: Sequence[int], float_dtype: torch.dtype
) -> Tensor:
    """The dequantised logical tensor (fp32, ``shape``) from its stored parts."""
    check_spec(shape, tq, float_dtype)
    R, n = row_shape(shape, tq.axis)
    bits = tq.row_bits(R)
    G = tq.group_size
    q, scale = parts[f"{name}.q"], parts[f"{name}.scale"]
    zero = parts.get(f"{name}.zero")
    fb = float_bits(float_dtype)
    if len(set(bits)) == 1:
        b = bits[0]
        codes = q.reshape(R, n) if b == 8 else unpack_bits(q, b, R * n).reshape(R, n)
        return from_rows(dequantize_rows(codes, scale, zero, b, G), shape, tq.axis)
    allbits = _bytes_to_bits(q)
    out = torch.empty(R, n, dtype=torch.float32)
    off, r, iq, iz = 0, 0, 0, 0
    while r < R:
        e = r
        while e < R and bits[e] == bits[r]:
            e += 1
        b, cnt = bits[r], e - r
        codes = _from_bits(allbits[off : off + cnt * n * b], b).view(cnt, n)
        off += cnt * n * b
        if b == fb:  # raw container-dtype bits
            signed = torch.where(codes >= 1 << (fb - 1), codes - (1 << fb), codes)
            out[r:e] = signed.to(torch.int16 if fb == 16 else torch.int32).view(float_dtype).float()
        else:
            if b == 8:
                codes = torch.where(codes >= 128, codes - 256, codes)
            z = None
            if b < 8 and zero is not None:
                z = zero[iz : iz + cnt]
                iz += cnt
            out[r:e] = dequantize_rows(codes, scale[iq : iq + cnt], z, b, G)
            iq += cnt
        r = e
    return from_rows(out, shape, tq.axis)


def check_parts(
    name: str, parts: dict[str, Tensor], tq: TensorQuant, shape: Sequence[int], float_dtype: torch.dtype
) -> None:
    """Value invariants of stored parts (after names/shapes/dtypes matched): scales finite and
    ≥ 0, zero points in [0, 2^b − 1], 8-bit codes ≠ −128, the stream's padding bits zero."""
    R, n = row_shape(shape, tq.axis)
    bits = tq.row_bits(R)
    s = parts[f"{name}.scale"].float()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise QuantError(f"{name}.scale has a negative or non-finite scale")
    z = parts.get(f"{name}.zero")
    if z is not None:
        zb = [b for b in bits if b < 8]
        hi = torch.tensor([(1 << b) - 1 for b in zb], dtype=torch.float32)[:, None]
        zf = z.float()
        if not bool(torch.isfinite(zf).all()) or bool((zf < 0).any()) or bool((zf > hi).any()):
            raise QuantError(f"{name}.zero has a zero point outside [0, 2^bits − 1]")
    q = parts[f"{name}.q"]
    if q.dtype == torch.int8:
        if bool((q == -128).any()):
            raise QuantError(f"{name}.q holds the code −128 (8-bit codes are in [−127, 127])")
        return
    used = sum(bits) * n
    if used % 8 and q.numel():
        if int(q[-1]) >> (used % 8):
            raise QuantError(f"{name}.q has non-zero padding bits after its last code")
    if any(b == 8 for b in bits) and len(set(bits)) > 1:
        allbits = _bytes_to_bits(q)
        off = 0
        for b in bits:
            if b == 8 and bool((_from_bits(allbits[off : off + 8 * n], 8) == 128).any()):
                raise QuantError(f"{name}.q holds the code −128 (8-bit codes are in [−127, 127])")
            off += b * n


# ----------------------------------------------------------------------------- plans
def scheme_bits(scheme: str) -> tuple[int, bool]:
    """(code bits, asymmetric) of a fixed scheme."""
    return {"int8": (8, False), "int4": (4, False), "int4-asym": (4, True)}[scheme]


def header_cost(name: str, tq: TensorQuant | None) -> int:
    """Approximate header + manifest bytes of storing ``name`` under ``tq`` (for plan decisions
    and budgets; the exact file size is always measured)."""
    if tq is None:
        return 60 + len(name)
    nb = 1 if isinstance(tq.bits, int) else len(tq.bits)
    return (3 if tq.zero else 2) * (62 + len(name)) + 70 + len(name) + 3 * nb


def bytes_per_value(scheme: str, group_size: int, float_dtype: torch.dtype) -> float:
    """Average stored bytes per float value under a fixed scheme (for configuration budgets)."""
    if scheme in ("none", "auto"):
        return float_bits(float_dtype) / 8
    b, z = scheme_bits(scheme)
    return b / 8 + (4 if z else 2) / group_size


def choose_axis(
    x: Tensor, bits: int, group_size: int, zero: bool = False, float_dtype: torch.dtype = torch.float16
) -> int:
    """The group axis of a tensor with no declared one: the longest dimension (each rank direction
    of a factor gets its own scales), unless another axis at most doubles the number of scales and
    at least halves the squared error — e.g. a vector bank (h×b, h > b) whose vectors are its rows
    and differ in scale. (A smaller group always lowers the error, at the price of more scales;
    the bound on scales keeps the comparison fair.)"""
    shape = tuple(x.shape)
    best = group_axis(shape)
    if x.dim() < 2 or x.numel() == 0:
        return best

    def n_scales(ax: int) -> int:
        R, n = row_shape(shape, ax)
        return R * max(1, _ceil_div(n, group_size))

    xf = x.detach().float()

    def err(ax: int) -> float:
        return float((roundtrip(xf, TensorQuant(bits, ax, group_size, zero), float_dtype) - xf).square().sum())

    others = [ax for ax in range(x.dim()) if ax != best and shape[ax] > 1 and n_scales(ax) <= 2 * n_scales(best)]
    if not others:
        return best
    e_best = err(best)
    e, ax = min((err(a), a) for a in others)
    return ax if e < 0.5 * e_best else best


def plan_uniform(
    tensors: dict[str, Tensor],
    scheme: str,
    group_size: int,
    float_dtype: torch.dtype,
    axes: Callable[[str, tuple[int, ...]], int | None] | None = None,
) -> Storage | None:
    """One width for every float tensor that quantising makes smaller (a tiny tensor whose
    scales and extra header entries would outweigh its savings stays in the container dtype).
    ``axes(name, shape)`` (a form's ``quant_axis``) may declare a tensor's group axis; otherwise
    :func:`choose_axis` picks it."""
    if scheme == "none":
        return None
    if scheme not in ("int8", "int4", "int4-asym"):
        raise QuantError(f"unknown quantisation scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    b, z = scheme_bits(scheme)
    plan: dict[str, TensorQuant] = {}
    for name, t in sorted(tensors.items()):
        if not t.is_floating_point() or t.numel() == 0:
            continue
        shape = tuple(t.shape)
        ax = axes(name, shape) if axes else None
        tq = TensorQuant(b, choose_axis(t, b, group_size, z, float_dtype) if ax is None else ax, group_size, z)
        plain = stored_bytes(shape, None, float_dtype) + header_cost(name, None)
        if stored_bytes(shape, tq, float_dtype) + header_cost(name, tq) < plain:
            plan[name] = tq
    return Storage(scheme, group_size, plan)


# ----------------------------------------------------------------------------- fake quantisation
def fake_quant(x: Tensor, tq: TensorQuant, float_dtype: torch.dtype = torch.float16) -> Tensor:
    """Straight-through fake quantisation: the forward value is exactly what the container
    stores under ``tq`` (dequantised), the gradient is the identity (x's own)."""
    with torch.no_grad():
        xq = roundtrip(x, tq, float_dtype).to(x.dtype)
    return x + (xq - x).detach()


class FakeQuant(nn.Module):
    """Parametrization: a parameter seen through :func:`fake_quant` (quantisation-aware training)."""

    def __init__(self, tq: TensorQuant, float_dtype: torch.dtype):
        super().__init__()
        self.tq, self.float_dtype = tq, float_dtype

    def forward(self, x: Tensor) -> Tensor:
        return fake_quant(x, self.tq, self.float_dtype)


@dataclass
class QuantHandle:
    """What :func:`attach_fake_quant` attached. ``params``: the form's parameters seen through the
    fake quantiser; ``names``: the tensors covered; ``skipped``: stored tensors that are not
    parameters of the form (left as they are). ``remove()`` detaches and restores the latent
    floats (the container then quantises them exactly as the forward did)."""

    form: nn.Module
    entries: list[tuple[nn.Module, str]]
    params: list[nn.Parameter]
    names: list[str]
    skipped: list[str]
    _removed: bool = field(default=False, repr=False)

    def remove(self) -> None:
        if self._removed:
            return
        for mod, attr in self.entries:
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        self._removed = True


def parameter_map(form: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Parameter]]:
    """Stored tensor name → (owning module, attribute, parameter) for every float tensor of
    ``form.tensors()`` that is a view of one of the form's parameters (same memory, shape, strides)."""
    params = {}
    for pname, p in form.named_parameters():
        mod_name, _, attr = pname.rpartition(".")
        params[(p.data_ptr(), tuple(p.shape), p.stride())] = (
            form.get_submodule(mod_name) if mod_name else form,
            attr,
            p,
        )
    out = {}
    for name, t in form.tensors().items():  # type: ignore[operator]
        if t.is_floating_point() and t.numel():
            key = (t.data_ptr(), tuple(t.shape), t.stride())
            if key in params:
                out[name] = params[key]
    return out


def attach_fake_quant(form: nn.Module, storage: Storage, float_dtype: torch.dtype = torch.float16) -> QuantHandle:
    """Quantisation-aware training: every stored tensor of ``storage`` that is a form parameter is
    seen through :func:`fake_quant` by ``form.factors`` (straight-through gradients to the latent
    float parameter). Optimise ``handle.params`` (or the form's own groups); ``handle.remove()``."""
    form.train()  # forms that keep source tensors verbatim switch to their parameters
    pmap = parameter_map(form)
    entries, params, names = [], [], []
    for name in sorted(storage.tensors):
        if name not in pmap:
            continue
        mod, attr, p = pmap[name]
        parametrize.register_parametrization(mod, attr, FakeQuant(storage.tensors[name], float_dtype), unsafe=True)
        params.append(p)
        entries.append((mod, attr))
        names.append(name)
    return QuantHandle(form, entries, params, names, sorted(set(storage.tensors) - set(pmap)))
