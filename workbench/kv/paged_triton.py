"""Paged decode attention as a Triton kernel: keys and values read in place through block tables.

The portable path (:meth:`workbench.kv.paged.PagedKVCache.gather`) copies each sequence's blocks
into a dense tensor before SDPA reads them: at batch 256 and 640-token contexts that is about 1 GB
of extra traffic per layer. This kernel instead walks each sequence's block table and reads every
key and value once (vLLM's PagedAttention), with the *split-K* of flash-decoding so that even
batch 1 keeps the GPU busy:

    program (sequence b, KV head h, split s):      # grid [B, Hkv, splits]
        q  = the G = H / Hkv query heads sharing KV head h       [G, d]
        for each tile of 64 tokens of split s (their blocks from block_tables[b]):
            k, v = pool[block of each token, offset, h]           [64, d]
            scores = q k^T / sqrt(d), masked past the length      [G, 64]  (tensor cores)
            online softmax: running max m, sum l, acc = sum p v
        write (m, l, acc) of this split
    combine (sequence b, query head):  out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M)

GPU only (Triton); tests on a GPU compare it with the gather path. Taught in notebook 03.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the gather path is used
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, Tables, Lens, M, L, Acc, scale,
                      s_qb, s_qh, s_kb, s_ks, s_kh, s_tb, s_mb, s_mh, s_ab, s_ah, s_as,
                      Cos, Sin, Slots, Out, s_cb, s_ob, s_oh, K_OFF, V_OFF,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr,
                      D: tl.constexpr, TILE: tl.constexpr, PER_SPLIT: tl.constexpr,
                      IEEE: tl.constexpr, FUSED: tl.constexpr, DIRECT: tl.constexpr):
        b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(Lens + b)
        g = tl.arange(0, GROUP_PAD)
        heads = kvh * GROUP + g
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)  # [G, D] (rows past G are zero)
        end = length  # tokens read from the pools
        if FUSED:  # Q is the qkv projection [B, (H + 2 Hkv) D]: RoPE here, the new token apart
            c = tl.load(Cos + b * s_cb + d).to(tl.float32)  # [D]
            s = tl.load(Sin + b * s_cb + d).to(tl.float32)
            partner = (d + D // 2) % D  # "rotate half": (x1, x2) -> (-x2, x1)
            sign = tl.where(d < D // 2, -1.0, 1.0)
            q_rot = tl.load(Q + b * s_qb + heads[:, None] * s_qh + partner[None, :],
                            mask=(g < GROUP)[:, None], other=0.0)
            q = (q.to(tl.float32) * c + q_rot.to(tl.float32) * sign * s).to(q.dtype)
            row = Q + b * s_qb + kvh * D
            k_new = (tl.load(row + K_OFF + d).to(tl.float32) * c
                     + tl.load(row + K_OFF + partner).to(tl.float32) * sign * s).to(q.dtype)
            v_new = tl.load(row + V_OFF + d)  # [D]
            end = length - 1  # the pools hold the tokens before this one
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        lo = split * PER_SPLIT
        hi = tl.minimum(lo + PER_SPLIT, end)
        for start in range(lo, hi, TILE):  # TILE tokens (TILE / BLOCK blocks) at a time
            tok = start + tl.arange(0, TILE)
            live = tok < end
            block = tl.load(Tables + b * s_tb + tok // BLOCK, mask=live, other=0)  # [TILE]
            at = block[:, None] * s_kb + (tok % BLOCK)[:, None] * s_ks + kvh * s_kh + d[None, :]
            k = tl.load(K + at, mask=live[:, None], other=0.0)  # [TILE, D]
            v = tl.load(V + at, mask=live[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(live[None, :], scores * scale, float("-inf"))  # [G, TILE]
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if FUSED:
            if (end >= lo) & (end < lo + PER_SPLIT):  # this split holds the new token: store it
                slot = tl.load(Slots + b)
                at_new = (slot // BLOCK) * s_kb + (slot % BLOCK) * s_ks + kvh * s_kh + d
                tl.store(K + at_new, k_new)
                tl.store(V + at_new, v_new)
                score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
                m_new = tl.maximum(m, score)  # [G]: one more step of the online softmax
                p_new = tl.exp(score - m_new)
                alpha = tl.exp(m - m_new)
                l = l * alpha + p_new
                acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
                m = m_new
        keep = g < GROUP
        if DIRECT:  # one split: the output, no combine pass
            tl.store(Out + b * s_ob + heads[:, None] * s_oh + d[None, :],
                     (acc / l[:, None]).to(Out.dtype.element_ty), mask=keep[:, None])
        else:
            tl.store(M + b * s_mb + heads * s_mh + split, m, mask=keep)
            tl.store(L + b * s_mb + heads * s_mh + split, l, mask=keep)
            tl.store(Acc + b * s_ab + heads[:, None] * s_ah + split * s_as + d[None, :], acc,
                     mask=keep[:, None])

    @triton.jit
    def _combine_kernel(M, L, Acc, Out, s_mb, s_mh, s_ab, s_ah, s_as, s_ob, s_oh,
                        SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D)
        live = s < SPLITS
        m = tl.load(M + b * s_mb + h * s_mh + s, mask=live, other=float("-inf"))
        l = tl.load(L + b * s_mb + h * s_mh + s, mask=live, other=0.0)
        top = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # empty splits weigh nothing
        acc = tl.load(Acc + b * s_ab + h * s_ah + s[:, None] * s_as + d[None, :],
                      mask=live[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(Out + b * s_ob + h * s_oh + d, out.to(Out.dtype.element_ty))


    @triton.jit
    def _write_kernel(KP, VP, K, V, Slots, s_ps, s_ph, s_kb, s_kh, s_vb, s_vh, D: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        slot = tl.load(Slots + b)
        d = tl.arange(0, D)
        tl.store(KP + slot * s_ps + h * s_ph + d, tl.load(K + b * s_kb + h * s_kh + d))
        tl.store(VP + slot * s_ps + h * s_ph + d, tl.load(V + b * s_vb + h * s_vh + d))


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store this step's k, v [B, Hkv, d] at pool slots [B] (one kernel for both)."""
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    B, Hkv, D = k.shape
    _write_kernel[(B, Hkv)](k_pool, v_pool, k, v, slots, Hkv * D, D, k.stride(0), k.stride(1),
                            v.stride(0), v.stride(1), D=D)


def num_splits(batch: int, kv_heads: int, tiles: int, target_programs: int = 264,
               direct: bool = False) -> int:
    """Splits of each sequence's tiles so that batch x kv_heads x splits fills the GPU (264: two
    programs per SM of an H100/H200). With ``direct`` (:func:`rope_paged_decode`, whose one split
    writes the output itself), one split as soon as batch x kv_heads give about one program per
    SM (128) over a short context (<= 8 tiles): the combine pass it saves is a launch of its own,
    about what a few more programs per SM would gain (to be measured: tools/gpu/attention.sh)."""
    if direct and batch * kv_heads >= 128 and tiles <= 8:
        return 1
    return max(1, min(tiles, -(-target_programs // (batch * kv_heads))))


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its blocks.

    q [B, H, d]; pools [num_blocks, block_size, Hkv, d]; tables [B, nb]; lens [B] -> [B, H, d].
    """
    q = q.contiguous()
    return _attend(q, q.shape[1], q.stride(1), k_pool, v_pool, tables, lens, splits)


def rope_paged_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                      tables: torch.Tensor, lens: torch.Tensor, heads: int,
                      splits: int | None = None, **launch) -> torch.Tensor:
    """:func:`paged_decode` with RoPE and the KV write done by the same kernel.

    qkv [B, (H + 2 Hkv) d] is the projection before RoPE; cos/sin [B, d] the angles of each row's
    position; slots [B] where its new key and value go. Each program rotates its query heads and
    the new key as it loads them, reads the ``lens - 1`` earlier tokens from the pools, and the
    program whose split holds position ``lens - 1`` writes the new key and value there and adds
    them to its softmax from registers - three launches of small kernels per layer fewer (RoPE of
    q and of k, the write), and with one split no combine pass. Returns [B, H, d].
    ``launch``: ``tile``, ``num_warps``, ``num_stages`` of the split kernel instead of the defaults
    (tools/attention_configs.py times them).
    """
    qkv = qkv.contiguous()
    Hkv, D = k_pool.shape[2], k_pool.shape[3]
    assert qkv.shape[1] == (heads + 2 * Hkv) * D, (qkv.shape, heads, Hkv, D)
    cos, sin = cos.reshape(-1, D).contiguous(), sin.reshape(-1, D).contiguous()  # [B, d]
    return _attend(qkv, heads, D, k_pool, v_pool, tables, lens, splits,
                   fused=(cos, sin, slots, heads * D, (heads + Hkv) * D), **launch)


def _attend(q, H, s_qh, k_pool, v_pool, tables, lens, splits, fused=None, tile=None,
            **compile_options) -> torch.Tensor:
    """Launch the split kernel (and the combine kernel unless one split went straight to the
    output): ``q`` rows of stride ``q.stride(0)``, head h's query at ``h * s_qh``.
    ``compile_options`` (num_warps, num_stages) go to the split kernel's launch."""
    B, D = q.shape[0], k_pool.shape[3]
    block, Hkv = k_pool.shape[1], k_pool.shape[2]
    nb = tables.shape[1]
    # tokens per iteration (several blocks, one tensor-core tile)
    tile = tile or (64 if D <= 64 else 32)
    splits = splits or num_splits(B, Hkv, -(-nb * block // tile), direct=fused is not None)
    per_split = -(-(nb * block) // (splits * tile)) * tile  # tokens per split, whole tiles
    group = H // Hkv
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    direct = fused is not None and splits == 1
    if direct:  # the kernel writes the output; m, l, acc are not used
        m = l = acc = out
    else:
        m = torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    cos, sin, slots, k_off, v_off = fused if fused is not None else (q, q, lens, 0, 0)
    _split_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, tables, lens, m, l, acc, 1.0 / math.sqrt(D),
        q.stride(0), s_qh, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        tables.stride(0), m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
        cos, sin, slots, out, cos.stride(0), out.stride(0), out.stride(1), k_off, v_off,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK=block, D=D,
        TILE=tile, PER_SPLIT=per_split, IEEE=q.dtype == torch.float32, FUSED=fused is not None,
        DIRECT=direct, **compile_options)
    if not direct:
        _combine_kernel[(B, H)](m, l, acc, out, m.stride(0), m.stride(1), acc.stride(0),
                                acc.stride(1), acc.stride(2), out.stride(0), out.stride(1),
                                SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
                                D=D)
    return out
