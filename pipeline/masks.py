"""The compression attention mask, two ways.

Stage 1 trains on ``[X][C][D]`` (X = the input, C = the K compression tokens, D = the dialogue
``Q_1 A_1 … Q_t A_t``).  Row attends to column (spec, docs/coma-method.md):

    from \\ to   X        C        D
    X           causal   no       no
    C           yes      causal   no
    D           NO       yes      causal

so the dialogue reads the image only through C.  Note that X and C together are plain causal
attention over ``[X][C]``, and D is causal attention over ``[C][D]`` aligned at the bottom right
(each D token sees all of C plus the D tokens up to itself).  That gives two implementations:

1. :func:`reference_mask` — an explicit additive 4-D mask ``[B, 1, L, L]`` handed to eager/SDPA
   attention, the way the paper's code does it.  O(L²) memory, rules out flash-attention.

2. :func:`coma_attention_forward` — an attention function registered with transformers'
   ``AttentionInterface``.  Inside every decoder layer it runs two causal attentions on
   packed (unpadded) segments: ``[X][C] → [X][C]`` and ``D → [C][D]`` (bottom-right causal).  No
   L×L mask exists; with flash-attention installed both calls are ``flash_attn_varlen_func``
   (whose causal mask is bottom-right aligned), on CPU/without flash they are per-segment SDPA
   calls (``is_causal`` for the square segment, a small ``|D|×(K+|D|)`` mask for the other).

   Why one pass with split attention instead of "encode [X][C], keep C's KV, run D against it":
   the projections and MLPs run once over all tokens either way, but the split keeps every
   layer a single Hugging Face decoder call, so gradient checkpointing (which drops any KV
   cache during training) and ZeRO-3 parameter gathering work unchanged, and the rotary
   positions are the ones computed once for the whole sequence — identical to the reference.

Both paths use the same positions and produce the same loss and gradients (tests/test_model_mask.py,
fp32 on CPU: loss within atol 1e-6 / rtol 1e-5, every parameter gradient within atol 1e-6 /
rtol 1e-4, over batches mixing image sizes with left or right padding, both families).

Layout: within each row the real tokens are contiguous (left or right padding) and C is the run
of compression-token ids; everything real before C is X, everything real after C is D.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

LAYOUT_KWARG = "coma_layout"


@dataclass
class PackedSegments:
    """The varlen form of a layout; index tensors address the flattened ``[B·L]`` token axis:

    * ``idx_xc`` / ``cu_xc``: the ``[X][C]`` segments (queries = keys), causal;
    * ``idx_dq`` / ``cu_dq``: the D queries; ``idx_dk`` / ``cu_dk``: their keys ``[C][D]``,
      bottom-right causal.
    """

    idx_xc: torch.Tensor
    cu_xc: torch.Tensor
    idx_dq: torch.Tensor
    cu_dq: torch.Tensor
    idx_dk: torch.Tensor
    cu_dk: torch.Tensor
    max_xc: int
    max_dq: int
    max_dk: int


@dataclass
class CompressionLayout:
    """Where X, C and D lie in a padded batch, found once per forward (no host sync per layer).

    Per row b: real tokens ``[start, end)``, compression tokens ``[c0, c1)``; X = ``[start, c0)``,
    D = ``[c1, end)``.  :attr:`packed` (the flash-attention varlen form) is built on first use
    only, so the row-wise SDPA path never pays for index tensors it does not read.
    """

    rows: list[tuple[int, int, int, int]]          # (start, c0, c1, end) per row
    length: int                                    # L, the padded length
    device: torch.device

    @functools.cached_property
    def packed(self) -> PackedSegments:
        L, dev = self.length, self.device

        def pack(spans):
            idx = torch.cat([torch.arange(b * L + s, b * L + e) for b, (s, e) in enumerate(spans)])
            lens = torch.tensor([e - s for s, e in spans])
            cu = torch.zeros(len(spans) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens, 0)
            return idx.to(dev), cu.to(dev), int(lens.max()) if len(spans) else 0

        idx_xc, cu_xc, max_xc = pack([(s, c1) for s, c0, c1, e in self.rows])
        idx_dq, cu_dq, max_dq = pack([(c1, e) for s, c0, c1, e in self.rows])
        idx_dk, cu_dk, max_dk = pack([(c0, e) for s, c0, c1, e in self.rows])
        return PackedSegments(idx_xc, cu_xc, idx_dq, cu_dq, idx_dk, cu_dk, max_xc, max_dq, max_dk)


def find_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, compression_ids: torch.Tensor
              ) -> list[tuple[int, int, int, int]]:
    """``(start, c0, c1, end)`` per row; raises if a row's real tokens or its C run are not contiguous.

    input_ids, attention_mask: [B, L]; compression_ids: [K] long (the ids of C_0..C_{K-1})."""
    am = attention_mask.bool().cpu()
    is_c = torch.isin(input_ids, compression_ids.to(input_ids.device)).cpu() & am
    rows = []
    for b in range(input_ids.shape[0]):
        real = am[b].nonzero().flatten()
        cpos = is_c[b].nonzero().flatten()
        if real.numel() == 0 or cpos.numel() == 0:
            raise ValueError(f"batch row {b} has no compression tokens (or no tokens): "
                             "stage-1 inputs must be built by pipeline.collate.Collator")
        start, end = int(real[0]), int(real[-1]) + 1
        c0, c1 = int(cpos[0]), int(cpos[-1]) + 1
        if end - start != real.numel() or c1 - c0 != cpos.numel():
            raise ValueError(f"batch row {b}: real tokens or compression tokens are not contiguous")
        rows.append((start, c0, c1, end))
    return rows


def build_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, compression_ids: torch.Tensor
                 ) -> CompressionLayout:
    rows = find_rows(input_ids, attention_mask, compression_ids)
    return CompressionLayout(rows, input_ids.shape[1], input_ids.device)


# ------------------------------------------------------------------------------ reference path
def reference_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, compression_ids: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The explicit compression mask as an additive float ``[B, 1, L, L]`` tensor (0 = attend,
    ``finfo.min`` = blocked), usable by eager and SDPA attention.  Padding rows attend to
    themselves only, so no softmax row is empty (their outputs are never used)."""
    B, L = input_ids.shape
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for b, (s, c0, c1, e) in enumerate(find_rows(input_ids, attention_mask, compression_ids)):
        allowed[b, s:c1, s:c1] = causal[: c1 - s, : c1 - s]          # [X][C] causal
        allowed[b, c1:e, c0:c1] = True                                # D sees all of C
        allowed[b, c1:e, c1:e] = causal[: e - c1, : e - c1]          # D causal, never X
        pad = torch.cat([torch.arange(0, s), torch.arange(e, L)])
        allowed[b, pad, pad] = True
    mask = torch.zeros(B, 1, L, L, dtype=dtype)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return mask.to(input_ids.device)


# ------------------------------------------------------------------------------ efficient path
def _flash_varlen():
    try:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func
    except ImportError:
        pass
    return None


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(q, k, v, scale, dropout, causal=False, mask=None):
    """SDPA on [1, H, L, d] tensors (the fused CPU/GPU kernels need 4-D inputs; 3-D falls back
    to the unfused math path that materialises L×L scores).  GQA without copying K/V where
    torch supports it: ``enable_gqa`` on CUDA runs only in the flash and math kernels, and flash
    takes no mask, so with a mask (the dialogue's lower-right one) it would fall to the math
    kernel, an fp32 [H, |D|, K+|D|] score tensor per row and layer; there K/V (only C's and D's
    rows) are repeated per head group instead, which the memory-efficient kernel takes."""
    groups = q.shape[1] // k.shape[1]
    kw = {}
    if groups > 1:
        if _SDPA_GQA and mask is None:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                          scale=scale, **kw)


def _lower_right(lq: int, lk: int, device) -> torch.Tensor:
    """[lq, lk] bool: query i sees keys 0 .. lk - lq + i (a small |D|×(K+|D|) mask, never L×L)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                            cu_k: torch.Tensor, max_q: int, max_k: int, scale: float, dropout: float = 0.0,
                            use_flash: bool = False) -> torch.Tensor:
    """Causal attention over packed segments, aligned at the bottom right (query i of a segment
    with Lq queries and Lk keys sees keys ``0 .. Lk - Lq + i``) — flash-attention's convention.

    q: [Tq, Hq, d], k/v: [Tk, Hkv, d] (Hq a multiple of Hkv: grouped-query attention);
    cu_q/cu_k: [S+1] int32 segment offsets.  Returns [Tq, Hq, d] in q's dtype.  Without
    flash-attention, one SDPA call per segment.
    """
    if use_flash:
        fn = _flash_varlen()
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale, causal=True)
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qs = q[cq[i]:cq[i + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[i]:ck[i + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[i]:ck[i + 1]].transpose(0, 1).unsqueeze(0)
        lq, lk = qs.shape[2], ks.shape[2]
        if lq == 0:
            continue
        o = (_sdpa(qs, ks, vs, scale, dropout, causal=True) if lq == lk
             else _sdpa(qs, ks, vs, scale, dropout, mask=_lower_right(lq, lk, q.device)))
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)


def compression_attention_packed(query, key, value, layout: CompressionLayout, scale: float, dropout: float = 0.0,
                                 use_flash: bool = False) -> torch.Tensor:
    """Packed (varlen) form: gather the ``[X][C]`` segments and the ``D → [C][D]`` segments of
    all rows into flat token axes and run two varlen causal attentions — the flash-attention
    path (``flash_attn_varlen_func``); ``use_flash=False`` runs the same packing on SDPA."""
    B, Hq, L, d = query.shape
    qf = query.transpose(1, 2).reshape(B * L, Hq, d)
    kf = key.transpose(1, 2).reshape(B * L, key.shape[1], d)
    vf = value.transpose(1, 2).reshape(B * L, value.shape[1], d)
    p = layout.packed
    o_xc = varlen_causal_attention(qf[p.idx_xc], kf[p.idx_xc], vf[p.idx_xc], p.cu_xc, p.cu_xc,
                                   p.max_xc, p.max_xc, scale, dropout, use_flash)
    o_d = varlen_causal_attention(qf[p.idx_dq], kf[p.idx_dk], vf[p.idx_dk], p.cu_dq, p.cu_dk,
                                  p.max_dq, p.max_dk, scale, dropout, use_flash)
    out = qf.new_zeros(B * L, Hq, d)
    out = out.index_copy(0, p.idx_xc, o_xc.to(out.dtype)).index_copy(0, p.idx_dq, o_d.to(out.dtype))
    return out.view(B, L, Hq, d)


def compression_attention_rows(query, key, value, layout: CompressionLayout, scale: float,
                               dropout: float = 0.0) -> torch.Tensor:
    """Row-by-row form for SDPA (CPU, or GPU without flash-attention).  Tensors are cut with
    ``split`` (one backward per cut: a single concatenation) and the ``[X][C]`` part is a view,
    so only the small ``[C][D]`` keys/values are copied; the gather/scatter of the packed form
    would zero-fill a full [B·L, H, d] gradient per gather."""
    B, Hq, L, d = query.shape
    rows = []
    for b, (qb, kb, vb) in enumerate(zip(query.split(1, 0), key.split(1, 0), value.split(1, 0))):
        s, c0, c1, e = layout.rows[b]
        sizes = [s, c1 - s, e - c1, L - e]
        _, q_xc, q_d, _ = torch.split(qb, sizes, dim=2)
        _, k_xc, k_d, _ = torch.split(kb, sizes, dim=2)
        _, v_xc, v_d, _ = torch.split(vb, sizes, dim=2)
        parts = [query.new_zeros(1, Hq, s, d), _sdpa(q_xc, k_xc, v_xc, scale, dropout, causal=True)]
        if e > c1:
            k_cd = torch.cat([k_xc[:, :, c0 - s:], k_d], 2)       # C's keys (a view) + D's
            v_cd = torch.cat([v_xc[:, :, c0 - s:], v_d], 2)
            parts.append(_sdpa(q_d, k_cd, v_cd, scale, dropout, mask=_lower_right(e - c1, e - c0, query.device)))
        parts.append(query.new_zeros(1, Hq, L - e, d))
        rows.append(torch.cat(parts, 2))
    return torch.cat(rows, 0).transpose(1, 2)


def compression_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          layout: CompressionLayout, scale: float, dropout: float = 0.0,
                          use_flash: bool = False) -> torch.Tensor:
    """The compression mask without a mask.  query [B, Hq, L, d], key/value [B, Hkv, L, d] (as
    transformers' attention functions receive them, rotary already applied).  Returns the
    attention output [B, L, Hq, d] (transformers' convention); padding positions are zero."""
    if use_flash:
        return compression_attention_packed(query, key, value, layout, scale, dropout, use_flash=True)
    return compression_attention_rows(query, key, value, layout, scale, dropout)


class _BaseView:
    """An attention module as the base implementation should see it: every attribute of the
    module, except a config whose ``_attn_implementation`` is the base name."""

    def __init__(self, module, config):
        self.__dict__["_module"] = module
        self.__dict__["config"] = config

    def __getattr__(self, name):
        return getattr(self._module, name)


def _as_base(module, base: str):
    view = module.__dict__.get("_coma_base_view")
    if view is None or view.config._attn_implementation != base:
        import copy

        cfg = copy.copy(module.config)
        cfg._attn_implementation = base
        view = _BaseView(module, cfg)
        module.__dict__["_coma_base_view"] = view  # plain attribute: not a submodule, not in state_dict
    return view


def make_attention_forward(base: str):
    """An attention function for transformers' ``AttentionInterface``: with a
    :class:`CompressionLayout` in its kwargs it runs :func:`compression_attention`, otherwise
    it is exactly the ``base`` implementation (sdpa / flash_attention_2) — so the same model
    serves stage 1 and plain causal embedding passes."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    use_flash = base.startswith("flash")

    def base_fn(module, *args, **kwargs):
        if base == "eager":  # not in the interface: each modeling file has its own eager function
            return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, *args, **kwargs)

    def coma_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: Optional[float] = None, **kwargs):
        layout = kwargs.pop(LAYOUT_KWARG, None)
        if layout is None:
            # transformers' flash wrapper loads its kernel by ``module.config._attn_implementation``,
            # which names us, not flash: show it the module with the base name.
            mod = _as_base(module, base) if use_flash else module
            return base_fn(mod, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return compression_attention(query, key, value, layout, scale, dropout, use_flash), None

    return coma_attention_forward


def register_attention(base: str) -> str:
    """Register ``coma_<base>`` (attention + its mask function) and return the name.  Idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    name = f"coma_{base}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, make_attention_forward(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
