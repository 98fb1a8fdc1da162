"""A decode step with fewer, larger kernels: the GPU fast path under CUDA graphs (notebook 03).

Inside a CUDA graph the launch cost is gone, but each kernel still costs a few microseconds even
when it moves a few kilobytes; the model's plain forward runs about 40 kernels per layer
(RMSNorm alone is six elementwise ops), which at batch 1 takes longer than reading the weights.
This step computes the same function with:

- **fused weights**: q, k and v projections as one matrix ``[(H + 2 Hkv) d, hidden]``, gate and up
  as one ``[2 I, hidden]`` (one GEMM each instead of three and two);
- **compiled glue**: the residual add + RMSNorm, RoPE and SiLU x up are compiled by
  ``torch.compile`` (Inductor) into a few Triton kernels per layer; matrix products stay cuBLAS;
- **paged attention in place**: a Triton kernel reads the blocks through the block tables
  (:mod:`workbench.kv.paged_triton`); without Triton, the blocks are gathered and SDPA runs;
- optionally (``linear="triton"``), **the glue inside the matrix products**: one Triton kernel per
  product reads its weight once and adds the residual, applies RMSNorm and SwiGLU on the way
  (:mod:`workbench.engine.skinny`), so that a layer is five kernels - qkv, attention, o_proj,
  gate/up, down - and nothing is compiled.

It reads the same paged pools and block tables as :class:`~workbench.kv.paged.PagedKVCache`, and
its logits agree with the plain forward to float rounding (tests on GPU compare the tokens).

On a tensor-parallel rank (``reduce``: the TP group's all-reduce, returning the sum) the model is
the rank's shard: o_proj and down_proj produce partial sums, summed by the two all-reduces of each
layer between the compiled pieces (biases added once, after the sum); ``bench tp --fast`` times it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.kv.paged import PagedKVCache, gather_blocks
from workbench.model.llama import LlamaModel, RMSNorm
from workbench.model.rope import rope_cos_sin


ATTENTIONS = ("triton", "triton-rope", "gather")
LINEARS = ("torch", "triton", "fastest")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, as :class:`~workbench.model.llama.RMSNorm` computes it."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, d] rotated by cos/sin [b, 1, d] ("rotate half" layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def qkv_in(x, residual, norm_w, w_qkv, b_qkv, eps: float):
    """residual += x; h = norm(residual); returns h W_qkv [b, (H + 2 Hkv) d] and the residual."""
    residual = x if residual is None else residual + x
    return F.linear(_rms(residual, norm_w, eps), w_qkv, b_qkv), residual


def attention_in(x, residual, norm_w, w_qkv, b_qkv, cos, sin, eps: float, heads: int,
                 kv_heads: int, d: int):
    """residual += x; h = norm(residual); q, k, v = h W_qkv; RoPE.
    Returns q [b, H, d], k and v [b, Hkv, d] and the residual stream.

    (The write of k and v into the pools stays outside: compiled, an in-place write into an
    input became a copy of the whole pool - measured at 120 us per layer on an H100.)"""
    qkv, residual = qkv_in(x, residual, norm_w, w_qkv, b_qkv, eps)  # [b, (H + 2 Hkv) d]
    b = qkv.shape[0]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = _rope(q.view(b, heads, d), cos, sin)  # [b, H, d]
    k = _rope(k.view(b, kv_heads, d), cos, sin)  # [b, Hkv, d]
    return q, k, v.reshape(b, kv_heads, d), residual


def gather_attention(q, k_pool, v_pool, tables, mask):
    """The portable decode attention: gather each row's blocks, then SDPA. q [b, H, d] ->
    [b, H, d]; mask [b, 1, 1, S] additive."""
    H, Hkv = q.shape[1], k_pool.shape[2]
    keys, values = gather_blocks(k_pool, tables), gather_blocks(v_pool, tables)  # [b, Hkv, S, d]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask,
                                         enable_gqa=H != Hkv)  # [b, H, 1, d]
    return out[:, :, 0]


def swiglu_in(h, w_gate_up, b_gate_up):
    """silu(gate h) * up h [b, I] (down_proj's input) for a normed input h."""
    gate, up = F.linear(h, w_gate_up, b_gate_up).chunk(2, dim=-1)  # [b, I] each
    return F.silu(gate) * up


def mlp_act(o, residual, norm_w, w_gate_up, b_gate_up, eps: float):
    """residual += o (attention's output, summed over TP ranks); h = norm(residual);
    returns silu(gate h) * up h [b, I] (down_proj's input) and the residual stream."""
    residual = residual + o
    return swiglu_in(_rms(residual, norm_w, eps), w_gate_up, b_gate_up), residual


def mlp(o, residual, norm_w, w_gate_up, b_gate_up, w_down, eps: float):
    """:func:`mlp_act`, then down_proj without its bias (a partial sum on a TP rank)."""
    act, residual = mlp_act(o, residual, norm_w, w_gate_up, b_gate_up, eps)
    return F.linear(act, w_down), residual


def final_in(x, residual, norm_w, eps: float):
    """The LM head's input: norm(residual + x)."""
    return _rms(residual + x, norm_w, eps)


class FusedDecoder:
    """The decode step of ``model`` over paged ``kv`` with fused weights and compiled glue.

    ``attention``: "triton" reads the blocks in place (:mod:`workbench.kv.paged_triton`, GPU),
    "triton-rope" also applies RoPE and writes the new key and value in that kernel
    (:func:`~workbench.kv.paged_triton.rope_paged_decode`: three small kernels a layer fewer),
    "gather" copies the blocks out first (anywhere); "auto" takes "triton-rope" where Triton runs
    (on one H200, 2026-12-05, the 8B shape's step was 2-5 % faster than with "triton": docs/notes).
    ``compile``: True, False (eager glue) or a ``torch.compile`` mode for the glue and the GEMMs
    inside it. ``linear``: "torch" (F.linear: cuBLAS on GPUs, glue compiled around it) or "triton"
    (:func:`~workbench.engine.skinny.skinny_linear`, the glue inside the products; needs the
    "triton-rope" attention; steps of more than 64 rows take the "torch" way) or "fastest" (the
    "torch" way, but o_proj, down_proj and the LM head each take the skinny kernel, without fused
    glue, where :func:`~workbench.engine.skinny.faster_than_cublas` timed it faster for the step's
    shape, before capture; needs Triton on a GPU); "auto" is "torch".

    ``reduce_norm`` (a tensor-parallel rank on GPUs, instead of ``reduce``): an
    :class:`~workbench.parallel.allreduce_norm.AllReduceAddNorm` - o_proj and down_proj write their
    partial sums into its symmetric buffer and one kernel sums them over the ranks, adds the
    residual and applies the next RMSNorm (:meth:`_reduce_norm_step`; "triton-rope" attention and
    "torch" products only).
    """

    def __init__(self, model: LlamaModel, kv: PagedKVCache, compile: bool | str = True,
                 attention: str = "auto", reduce=None, linear: str = "auto",
                 reduce_norm=None) -> None:
        from workbench.engine import skinny
        from workbench.kv import paged_triton

        self.model, self.kv, self.config, self.reduce = model, kv, model.config, reduce
        c = model.config
        self.shape = (c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        if attention == "auto":
            attention = "triton-rope" if paged_triton.available(model.device) else "gather"
        if attention not in ATTENTIONS:
            raise WorkbenchError(f"attention must be auto or one of {', '.join(ATTENTIONS)}, "
                                 f"not {attention!r}")
        self.attention = attention
        linear = "torch" if linear == "auto" else linear
        if linear not in LINEARS:
            raise WorkbenchError(f"linear must be auto or one of {', '.join(LINEARS)}, not {linear!r}")
        if linear == "triton" and (attention != "triton-rope" or not skinny.available(model.device)):
            raise WorkbenchError("linear='triton' needs Triton on a GPU and attention='triton-rope' "
                                 f"(here: attention {attention!r}, device {model.device})")
        if linear == "fastest" and not skinny.available(model.device):
            raise WorkbenchError(f"linear='fastest' needs Triton on a GPU (here: {model.device})")
        self.linear = linear
        if reduce_norm is not None and (reduce is not None or attention != "triton-rope"
                                        or linear != "torch" or not isinstance(model.norm, RMSNorm)):
            raise WorkbenchError("reduce_norm takes the place of reduce, with attention "
                                 "'triton-rope', linear 'torch' and a final RMSNorm (here: "
                                 f"attention {attention!r}, linear {linear!r}, reduce "
                                 f"{'given' if reduce is not None else 'none'})")
        self.reduce_norm = reduce_norm
        # "fastest": the products that may take the skinny kernel, and the test that decides
        self._skinny, self._faster = skinny.skinny_linear, skinny.faster_than_cublas
        # rows up to which a step takes the skinny products (0: never)
        self.skinny_rows = skinny.MAX_ROWS if linear == "triton" else 0
        # a plain LM head after an RMSNorm: the norm's input, normalized, goes to one product (not
        # a tensor-parallel head, nor a pipeline stage without one)
        self.plain_head = (type(model.lm_head) is torch.nn.Linear
                           and isinstance(model.norm, RMSNorm))
        self.layers = []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            cat = (lambda *ps: None if ps[0] is None else torch.cat(ps))  # noqa: E731
            self.layers.append(dict(
                norm1=layer.input_layernorm.weight, norm2=layer.post_attention_layernorm.weight,
                w_qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                b_qkv=cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                w_o=a.o_proj.weight, b_o=a.o_proj.bias,
                w_gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                b_gate_up=cat(m.gate_proj.bias, m.up_proj.bias),
                w_down=m.down_proj.weight, b_down=m.down_proj.bias))
        # compile: True (Inductor's default mode), False (eager), or a torch.compile mode, e.g.
        # "max-autotune-no-cudagraphs": Inductor times Triton GEMM templates against cuBLAS
        mode = compile if isinstance(compile, str) else None
        options = dict(dynamic=True, fullgraph=True, mode=mode)
        if compile:  # batch 1 and >= 2, with and without a residual yet, per mode and per piece:
            import torch._dynamo.config as dynamo  # past 8 versions fullgraph is an error, not eager

            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        self.attention_in = torch.compile(attention_in, **options) if compile else attention_in
        self.qkv_in = torch.compile(qkv_in, **options) if compile else qkv_in
        self.mlp = torch.compile(mlp, **options) if compile else mlp
        self.mlp_act = torch.compile(mlp_act, **options) if compile else mlp_act
        self.final_in = torch.compile(final_in, **options) if compile else final_in
        self.swiglu_in = torch.compile(swiglu_in, **options) if compile else swiglu_in
        self.norm_in = torch.compile(_rms, **options) if compile else _rms

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """Logits [b, vocab] of one decode step: ids/positions/slots/context_lens [b],
        tables [b, nb] (the blocks each row attends over)."""
        model, eps = self.model, self.config.rms_norm_eps
        x = model.embed_tokens(ids)  # [b, hidden]
        cos, sin = rope_cos_sin(model.inv_freq, positions[:, None], x.dtype)  # [b, 1, d] each
        if self.reduce_norm is not None:
            return self._reduce_norm_step(x, cos, sin, slots, tables, context_lens)
        if ids.shape[0] <= self.skinny_rows:
            return self._skinny_step(x, cos, sin, slots, tables, context_lens)
        mask = None
        if self.attention == "gather":
            S = tables.shape[1] * self.kv.block_size
            keep = torch.arange(S, device=ids.device) < context_lens[:, None]  # [b, S]
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=ids.device).masked_fill(
                ~keep, float("-inf"))[:, None, None]  # [b, 1, 1, S] additive, once per step
        residual = None
        for i, w in enumerate(self.layers):
            attn, residual = self._attention(i, w, x, residual, cos, sin, slots, tables,
                                             context_lens, mask)  # [b, H, d]
            o = self._summed(self._product(attn.reshape(attn.shape[0], -1), w["w_o"]), w["b_o"])
            if self.linear == "fastest":
                act, residual = self.mlp_act(o, residual, w["norm2"], w["w_gate_up"],
                                             w["b_gate_up"], eps)
                x = self._product(act, w["w_down"])
            else:
                x, residual = self.mlp(o, residual, w["norm2"], w["w_gate_up"], w["b_gate_up"],
                                       w["w_down"], eps)
            x = self._summed(x, w["b_down"])
        head, norm = model.lm_head, model.norm
        if self.linear == "fastest" and self.plain_head:
            logits = self._product(self.final_in(x, residual, norm.weight, norm.eps), head.weight)
            return logits if head.bias is None else logits + head.bias
        return head(norm(residual + x))  # [b, vocab]

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W^T: cuBLAS, or with ``linear="fastest"`` the skinny kernel where it was timed faster
        for this shape."""
        if self.linear == "fastest" and self._faster(x, weight):
            return self._skinny(x, weight)
        return F.linear(x, weight)

    def _skinny_step(self, x, cos, sin, slots, tables, context_lens) -> torch.Tensor:
        """The step as five kernels a layer (:mod:`workbench.engine.skinny`). The residual stream
        is carried as (residual, out): each norm kernel adds the previous block's summed output to
        it and stores the sum, so a tensor-parallel rank's all-reduce sees only its partial sum."""
        from workbench.engine.skinny import skinny_linear
        from workbench.kv.paged_triton import rope_paged_decode

        model, eps, H = self.model, self.config.rms_norm_eps, self.shape[1]
        residual, out = x, None  # layer 0's residual is the embedding, nothing to add yet
        for i, w in enumerate(self.layers):
            qkv = skinny_linear(residual, w["w_qkv"], add=out, norm=w["norm1"], eps=eps,
                                bias=w["b_qkv"])
            if out is not None:
                qkv, residual = qkv
            attn = rope_paged_decode(qkv, cos, sin, self.kv.k[i], self.kv.v[i], slots, tables,
                                     context_lens, H)  # [b, H, d]
            o = self._row_parallel(attn.reshape(attn.shape[0], -1), w["w_o"], w["b_o"])
            act, residual = skinny_linear(residual, w["w_gate_up"], add=o, norm=w["norm2"],
                                          eps=eps, bias=w["b_gate_up"], swiglu=True)
            out = self._row_parallel(act, w["w_down"], w["b_down"])
        head, norm = model.lm_head, model.norm
        if self.plain_head:  # one kernel: add, norm, head
            return skinny_linear(residual, head.weight, add=out, norm=norm.weight, eps=norm.eps,
                                 bias=head.bias)[0]
        return head(norm(residual + out))  # a tensor-parallel head, or none (not the last stage)

    def _reduce_norm_step(self, x, cos, sin, slots, tables, context_lens) -> torch.Tensor:
        """The step with the all-reduces fused into the next norm: a layer is the qkv product, the
        attention kernel, o_proj into the symmetric buffer, the fused all-reduce + residual add +
        RMSNorm, gate/up with SwiGLU (compiled), down into the other buffer, the fused kernel
        again (its norm the next layer's, or the final one)."""
        from workbench.kv.paged_triton import rope_paged_decode

        R, model, (eps, H) = self.reduce_norm, self.model, self.shape[:2]
        b = x.shape[0]
        R.begin()
        residual = x.contiguous()  # this step's own tensor: updated in place from here
        h = self.norm_in(residual, self.layers[0]["norm1"], eps)
        for i, w in enumerate(self.layers):
            qkv = F.linear(h, w["w_qkv"], w["b_qkv"])
            attn = rope_paged_decode(qkv, cos, sin, self.kv.k[i], self.kv.v[i], slots, tables,
                                     context_lens, H)  # [b, H, d]
            torch.mm(attn.reshape(b, -1), w["w_o"].t(), out=R.partial(b))
            h, residual = R(residual, w["norm2"], eps, w["b_o"])
            act = self.swiglu_in(h, w["w_gate_up"], w["b_gate_up"])
            torch.mm(act, w["w_down"].t(), out=R.partial(b))
            if i + 1 < len(self.layers):  # the next layer's input norm, or the final one
                h, residual = R(residual, self.layers[i + 1]["norm1"], eps, w["b_down"])
            else:
                h, residual = R(residual, model.norm.weight, model.norm.eps, w["b_down"])
        head = model.lm_head
        return F.linear(h, head.weight, head.bias) if self.plain_head else head(h)

    def _row_parallel(self, x, weight, bias):
        """o_proj or down as a skinny product: its bias inside the kernel on one device, after the
        all-reduce on a tensor-parallel rank (added once, to the sum)."""
        from workbench.engine.skinny import skinny_linear

        if self.reduce is None:
            return skinny_linear(x, weight, bias=bias)
        return self._summed(skinny_linear(x, weight), bias)

    def _attention(self, i, w, x, residual, cos, sin, slots, tables, context_lens, mask):
        """Layer i's attention of this step: the output [b, H, d] and the residual stream."""
        eps, H, Hkv, d = self.shape
        k_pool, v_pool = self.kv.k[i], self.kv.v[i]
        if self.attention == "triton-rope":  # RoPE, the k/v write and attention: one kernel
            from workbench.kv.paged_triton import rope_paged_decode

            qkv, residual = self.qkv_in(x, residual, w["norm1"], w["w_qkv"], w["b_qkv"], eps)
            return rope_paged_decode(qkv, cos, sin, k_pool, v_pool, slots, tables, context_lens,
                                     H), residual
        q, k, v, residual = self.attention_in(x, residual, w["norm1"], w["w_qkv"], w["b_qkv"],
                                              cos, sin, eps, H, Hkv, d)
        if self.attention == "triton":  # write this step's k/v, attend, in place
            from workbench.kv.paged_triton import paged_decode, write_kv

            write_kv(k_pool, v_pool, k, v, slots)
            return paged_decode(q, k_pool, v_pool, tables, context_lens), residual
        k_pool.view(-1, Hkv, d)[slots] = k
        v_pool.view(-1, Hkv, d)[slots] = v
        return gather_attention(q, k_pool, v_pool, tables, mask), residual

    def _summed(self, partial: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A row-parallel output: summed over the TP ranks (in place), then its bias, once."""
        if self.reduce is not None:
            partial = self.reduce(partial)  # in place (NCCL, gloo) or a new tensor (one-shot)
        return partial if bias is None else partial + bias
