"""transformers' FlashAttention-2 code path on a CPU: its own dispatch (``_flash_attention_forward``:
unpadding, ``_is_packed_sequence``, the varlen call) with the two CUDA kernels replaced by plain
torch attention of the same signature and semantics. What differs from FlashAttention-2 on a GPU
is only the arithmetic inside the kernel, not which tokens attend to which."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _attend(q, k, v, softmax_scale, causal):
    """``[L, H, D]`` queries over ``[L, Hkv, D]`` keys and values (grouped heads repeated)."""
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [H, L, D]
    if k.shape[0] != q.shape[0]:
        k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
        v = v.repeat_interleave(q.shape[0] // v.shape[0], 0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
    return out.transpose(0, 1)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """``flash_attn.flash_attn_func``: ``[B, L, H, D]``, each row attends only within itself."""
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, **_):
    """``flash_attn.flash_attn_varlen_func``: ``[T, H, D]`` tokens of several sequences, each
    attending only within its own ``cu_seqlens`` segment."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        out[start:end] = _attend(q[start:end], k[start:end], v[start:end], softmax_scale, causal)
    return out


@contextlib.contextmanager
def flash_attention_2(*models):
    """``models`` attend through transformers' FlashAttention-2 path, these kernels inside."""
    from transformers import modeling_flash_attention_utils as fa

    saved = {n: getattr(fa, n) for n in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn",
                                         "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn",
                                         "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")
             if hasattr(fa, n)}
    fa._loaded_implementation = "flash_attention_2"
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    before = [m.config._attn_implementation for m in models]
    try:
        for m in models:
            m.config._attn_implementation = "flash_attention_2"
        yield
    finally:
        for m, impl in zip(models, before):
            m.config._attn_implementation = impl
        for n, v in saved.items():
            setattr(fa, n, v)
