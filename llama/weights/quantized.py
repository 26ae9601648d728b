"""Quantized linear weights: how checkpoints store them and our kernels read them.

A quantized checkpoint is a Meta checkpoint (params.json, consolidated.NN.pth
written by torch.save, loaded memory-mapped with weights_only=True) whose
linear weights (attention wq/wk/wv/wo, feed-forward w1/w2/w3, output) are
stored quantized, each as one of these TYPES, under the weight's own name
plus, for the two with separate scales, `<name minus .weight>.scales`:

* "q8_0": `weight` int8 (N, K) in [-127, 127], `scales` float32 (N, K / 32):
  W[n, k] = weight[n, k] * scales[n, k // 32]. llama.cpp's Q8_0 with fp32
  scales (a GGUF Q8_0 block's fp16 scale converts exactly).
* "q4_1": `weight` uint8 (N, K / 2), `scales` float16 (N, K / 32, 2) = (d, m):
  W[n, 32 g + j] = q * d + m, q the low nibble of byte 16 g + j for j < 16,
  the high nibble of byte 16 g + j - 16 for j >= 16. llama.cpp's Q4_1 blocks
  with (d, m) moved out of the 4-bit stream; a GGUF Q4_1 block converts
  exactly, a Q4_0 block too (m = -8 d, exact in fp16).
* "q4_k", "q5_k", "q6_k" (BLOCK_TYPES): llama.cpp's K-quants as GGUF files
  hold them, `weight` uint8 (N, K / 256 * B), each row's super-blocks of 256
  weights back to back, B = 144, 176, 210 bytes; NO scales tensor (the
  scales are inside the blocks; `stored_shapes` gives None for them). K
  must be a multiple of 256. Q4_K / Q5_K block: fp16 d, fp16 dmin, 12
  bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32 (`kquant_scales`),
  [Q5_K: 32 bytes, bit j of byte i the fifth bit of weight i of sub-block
  j], 128 bytes of nibbles (byte 32 p + i: weight i of sub-block 2 p low,
  of 2 p + 1 high): W = d sc q - dmin m. Q6_K block: 128 bytes low nibbles,
  64 bytes high 2-bit pairs, 16 int8 scales (one per 16 weights), fp16 d:
  W = d sc (q - 32). `dequantize` is exact to gguf.quants' numpy
  dequantizers (same fp32 operations in the same order).

Embeddings and norms keep their float dtype. The type of every stored weight
follows from its dtype and shapes (`stored_type`), so files may mix types (a
4-bit model keeps its output layer in q8_0); params.json's "quantization"
says what made them (`describe`). Everything splits like the float weight
it stands for: rows with their scales; columns only at whole groups
(`check_split`). No kernel code here: llama/kernels reads these layouts.
"""

from typing import Dict, Optional, Tuple

import torch

GROUP = 32  # input columns per scale (q8_0) or per (d, m) pair (q4_1)
METHODS = ("int8", "int4")  # what `quantize` makes: int8 -> q8_0 everywhere; int4 -> q4_1, output q8_0
PARAMS_KEY = "quantization"  # params.json's record of how the weights were quantized
SCALES = ".scales"
ROW_CHUNK = 256  # rows quantized at a time: float temporaries of a few MB per weight, not of the whole tensor

# Per type: (weight dtype, input columns per stored column of `weight`, scales dtype, scales per group)
TYPES = {
    "q8_0": (torch.int8, 1, torch.float32, 1),
    "q4_1": (torch.uint8, 2, torch.float16, 2),
}


# K-quants: (input columns per block, bytes per block); weight uint8 (N, K / 256 * bytes), no scales
QK = 256
BLOCK_TYPES = {"q4_k": (QK, 144), "q5_k": (QK, 176), "q6_k": (QK, 210)}


class QuantizedWeightError(ValueError):
    """A stored quantized weight whose dtypes or shapes fit no type."""


def scales_key(weight_key: str) -> str:
    """`layers.0.attention.wq.weight` -> `layers.0.attention.wq.scales`."""
    return weight_key[: -len(".weight")] + SCALES if weight_key.endswith(".weight") else weight_key + SCALES


def weight_key(key: str) -> str:
    """The weight a key belongs to: itself, or the weight a `.scales` key scales."""
    return key[: -len(SCALES)] + ".weight" if key.endswith(SCALES) else key


def is_quantized(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int8, torch.uint8)


def stored_shapes(kind: str, n: int, k: int) -> Tuple[tuple, Optional[tuple]]:
    """(weight shape, scales shape) of an (n, k) weight stored as `kind`;
    scales shape None for the K-quants (their scales are in the blocks)."""
    if kind in BLOCK_TYPES:
        cols, size = BLOCK_TYPES[kind]
        return (n, k // cols * size), None
    _, per_col, _, per_group = TYPES[kind]
    scales = (n, k // GROUP) if per_group == 1 else (n, k // GROUP, per_group)
    return (n, k // per_col), scales


def stored_type(key: str, weight: torch.Tensor, scales: Optional[torch.Tensor], k: int) -> Optional[str]:
    """The type `weight` (with `scales`, None if the file has none) is stored
    as, for a weight of `k` input columns: None for a float weight; raises
    QuantizedWeightError for anything that fits no type."""
    if not is_quantized(weight):
        if scales is not None:
            raise QuantizedWeightError(f"{key} is {weight.dtype} but has {scales_key(key)}: only int8 and uint8 "
                                       "weights have scales; the file is damaged or from another tool")
        return None
    if weight.dtype == torch.uint8 and scales is None:
        return _block_type(key, weight, k)
    for kind, (w_dtype, _, s_dtype, _) in TYPES.items():
        if weight.dtype != w_dtype:
            continue
        want_w, want_s = stored_shapes(kind, weight.shape[0] if weight.dim() == 2 else -1, k)
        if k % GROUP:
            raise QuantizedWeightError(f"{key}: {kind} needs a multiple of {GROUP} input columns, this weight has {k}")
        if scales is None:
            raise QuantizedWeightError(f"{key} is stored as {kind} ({weight.dtype}) but {scales_key(key)} is "
                                       "missing: the file is damaged; write it again")
        if tuple(weight.shape) != want_w or tuple(scales.shape) != want_s or scales.dtype != s_dtype:
            raise QuantizedWeightError(
                f"{key}: a {kind} weight of {k} input columns is stored as {w_dtype} {want_w} with "
                f"{s_dtype} scales {want_s}; this file has {weight.dtype} {tuple(weight.shape)} with "
                f"{getattr(scales, 'dtype', None)} scales {tuple(scales.shape)}")
        return kind
    raise QuantizedWeightError(f"{key} has dtype {weight.dtype}, which no quantized type uses")


def _block_type(key: str, weight: torch.Tensor, k: int) -> str:
    """The K-quant a uint8 weight without scales is stored as: the one whose
    blocks make its row bytes for k input columns."""
    row = weight.shape[1] if weight.dim() == 2 else -1
    if k % QK:
        raise QuantizedWeightError(
            f"{key} is uint8 without {scales_key(key)}, so a K-quant ({', '.join(BLOCK_TYPES)}), which needs a "
            f"multiple of {QK} input columns; this weight has {k}. Convert the file with a type that fits "
            "(q8_0, q4_1), or the scales are missing and the file is damaged")
    for kind, (cols, size) in BLOCK_TYPES.items():
        if weight.dim() == 2 and row == k // cols * size:
            return kind
    wants = ", ".join(f"{kind} {k // cols * size}" for kind, (cols, size) in BLOCK_TYPES.items())
    raise QuantizedWeightError(
        f"{key} is uint8 {tuple(weight.shape)} without {scales_key(key)}: a K-quant of {k} input columns has "
        f"rows of ({wants}) bytes, and q4_1 ({k // 2} bytes) needs its scales; the file is damaged or from "
        "another tool")


def logical_shape(kind: Optional[str], weight: torch.Tensor) -> tuple:
    """The (N, K) a stored weight stands for."""
    if kind is None:
        return tuple(weight.shape)
    if kind in BLOCK_TYPES:
        cols, size = BLOCK_TYPES[kind]
        return weight.shape[0], weight.shape[1] // size * cols
    return weight.shape[0], weight.shape[1] * TYPES[kind][1]


def group_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q8_0 of an (N, K) float weight: (q int8 (N, K), scales float32 (N, K / GROUP)),
    scale = max |W| / 127 of the group, q = round(W / scale)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP, GROUP)
    scales = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(n, k), scales.contiguous()


def int4_groups(weight: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float32):
    """Asymmetric 4-bit per group of `group` input columns (llama.cpp's Q4_1):
    (q (N, K) in [0, 15], scale, min (N, K / group) fp32) with
    W ~= q * scale + min of q's group, scale and min rounded to
    `scale_dtype` (the kernel's). First the group's range in 15 steps; then,
    where it has a smaller squared error, the least-squares scale and min
    for those q, with q rounded again: one such step lowers the error the
    range alone leaves measurably (benchmarks/quant_quality.py), further
    steps do not."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)

    def rounded(scale, lo):
        scale, lo = scale.to(scale_dtype).float(), lo.to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
        return q, scale, lo, ((q * scale[..., None] + lo[..., None] - w) ** 2).sum(-1)

    lo = w.amin(-1)
    q, scale, lo, error = rounded((w.amax(-1) - lo) / 15, lo)
    sq, sq2, sw, sqw = q.sum(-1), (q * q).sum(-1), w.sum(-1), (q * w).sum(-1)  # least squares of w ~ q s + lo
    det = group * sq2 - sq * sq
    fit = det > 0  # q not all equal
    fit_scale = torch.where(fit, (group * sqw - sq * sw) / torch.where(fit, det, 1), scale)
    q2, scale2, lo2, error2 = rounded(fit_scale, torch.where(fit, (sw - fit_scale * sq) / group, lo))
    better = error2 < error
    q = torch.where(better[..., None], q2, q)
    return q.reshape(n, k), torch.where(better, scale2, scale), torch.where(better, lo2, lo)


def group_int4(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q4_1 of an (N, K) float weight: (packed uint8 (N, K / 2), scales
    float16 (N, K / GROUP, 2) = (scale, min)), q computed against the fp16
    scale and min (int4_groups). ValueError for weights beyond fp16's range."""
    n, k = weight.shape
    if not weight.isfinite().all() or weight.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError(f"int4 keeps fp16 scales: this ({n}, {k}) weight has values beyond fp16's range "
                         f"(±{torch.finfo(torch.float16).max:g}) or not finite; use --quantize int8")
    q, scale, lo = int4_groups(weight, GROUP, torch.float16)
    q = q.to(torch.uint8).reshape(n, k // GROUP, 2, GROUP // 2)
    packed = q[:, :, 0] | (q[:, :, 1] << 4)
    return packed.reshape(n, k // 2).contiguous(), torch.stack([scale, lo], -1).half().contiguous()


QUANTIZERS = {"q8_0": group_int8, "q4_1": group_int4}


def type_for(method: str, key: str) -> str:
    """The type `method` stores weight `key` as: int4 keeps the output layer
    in q8_0, as llama.cpp's 4-bit mixes keep it at 6 bits or more (the
    logits come straight out of it)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose from {list(METHODS)}")
    return "q4_1" if method == "int4" and not key.startswith("output.") else "q8_0"


def empty_stored(kind: str, n: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, scales) of `kind` for an (n, k) weight, allocated, not written
    (their pages come when first written)."""
    w_shape, s_shape = stored_shapes(kind, n, k)
    return torch.empty(w_shape, dtype=TYPES[kind][0]), torch.empty(s_shape, dtype=TYPES[kind][2])


def quantize(weight: torch.Tensor, kind: str, out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """(weight, scales) of `kind` for an (N, K) float weight, ROW_CHUNK rows at
    a time (rows are quantized independently: the result is the same as in
    one piece, and the float temporaries stay a few MB). `out`: tensors of
    stored_shapes to write into (a memory-mapped output file)."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"a ({n}, {k}) weight cannot be quantized in groups of {GROUP} input columns")
    if out is None:
        out = empty_stored(kind, n, k)
    for start in range(0, n, ROW_CHUNK):
        q, s = QUANTIZERS[kind](weight[start:start + ROW_CHUNK])
        out[0][start:start + ROW_CHUNK].copy_(q)
        out[1][start:start + ROW_CHUNK].copy_(s)
    return out


def dequantize(kind: str, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """The (N, K) float weight a stored one stands for, in PyTorch (any device):
    the fallback where our kernels do not run. K-quants (`scales` None) are
    computed in fp32, then converted to `dtype`."""
    n = weight.shape[0]
    if kind in BLOCK_TYPES:
        return _dequantize_blocks(kind, weight).to(dtype)
    if kind == "q8_0":
        w = weight.to(dtype).reshape(n, -1, GROUP) * scales.to(dtype)[..., None]
    elif kind == "q4_1":
        packed = weight.reshape(n, -1, GROUP // 2)
        q = torch.cat([packed & 15, packed >> 4], dim=-1).to(dtype)  # (n, groups, 32) in group order
        w = q * scales[..., 0:1].to(dtype) + scales[..., 1:2].to(dtype)
    else:
        raise ValueError(f"no PyTorch dequantization for {kind}")
    return w.reshape(n, -1)


def kquant_scales(packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes (..., 12) uint8 -> 6-bit (scales, mins) (..., 8):
    bytes 0-3 hold scales 0-3 in their low 6 bits and the top 2 bits of
    scales 4-7; bytes 4-7 the same for the mins; bytes 8-11 the low 4 bits
    of scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    return sc, mn


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian fp16 -> (...) float32."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _dequantize_blocks(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """A K-quant's (N, K) fp32 weight, with gguf.quants' fp32 operations in
    its order: (d * sc) * q - dmin * m; Q6_K (d * sc) * (q - 32)."""
    cols, size = BLOCK_TYPES[kind]
    n = weight.shape[0]
    b = weight.reshape(n, -1, size)  # (n, blocks, bytes)
    if kind == "q6_k":
        ql, qh, sc, d = b[..., :128], b[..., 128:192], b[..., 192:208], _fp16(b[..., 208:210])
        lo = torch.stack([ql[..., :64] & 15, ql[..., :64] >> 4, ql[..., 64:] & 15, ql[..., 64:] >> 4], -2)
        lo = lo.reshape(n, -1, 8, 32)  # sub-block r: ql half r // 4, nibble (r // 2) % 2, bytes 32 (r % 2) + i
        hi = torch.stack([(qh[..., :32] >> s) & 3 for s in (0, 2, 4, 6)]
                         + [(qh[..., 32:] >> s) & 3 for s in (0, 2, 4, 6)], -2)
        q = ((lo | (hi << 4)).to(torch.int8) - 32).float().reshape(n, -1, 16, 16)
        scale = d[..., None] * sc.view(torch.int8).float()  # (n, blocks, 16)
        return (scale[..., None] * q).reshape(n, -1)
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    sc, mn = kquant_scales(b[..., 4:16])
    qs = b[..., size - 128:].reshape(n, -1, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], -2).reshape(n, -1, 8, 32)  # sub-block 2 p: low nibbles, 2 p + 1: high
    if kind == "q5_k":
        qh = b[..., 16:48]  # bit j of byte i: the fifth bit of weight i of sub-block j
        q = q | torch.stack([((qh >> j) & 1) << 4 for j in range(8)], -2)
    scale = (d[..., None] * sc.float())[..., None]
    low = (dmin[..., None] * mn.float())[..., None]
    return (scale * q.float() - low).reshape(n, -1)


def column_unit(kind: Optional[str]) -> int:
    """Input columns a split of this type must keep together: a group, or a K-quant's block."""
    if kind in BLOCK_TYPES:
        return BLOCK_TYPES[kind][0]
    return 1 if kind is None else GROUP


def check_split(key: str, kind: Optional[str], k: int, size: int) -> None:
    """ValueError unless splitting `key`'s k input columns into `size` equal
    parts (a row-parallel layer on `size` ranks) keeps every group whole."""
    unit = column_unit(kind)
    if k % size or (k // size) % unit:
        works = [m for m in range(1, 65) if k % m == 0 and (k // m) % unit == 0]
        raise ValueError(f"{key} ({k} input columns, {kind}) cannot be split into {size} parts without cutting "
                         f"its groups of {unit} columns; sizes that work for it: {works}")


def describe(types: Dict[str, str], method: Optional[str], source: str) -> dict:
    """params.json's "quantization" record: what made the file and how many weights of each type."""
    counts: Dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"method": method, "group_size": GROUP, "source": source, "types": dict(sorted(counts.items()))}
