"""Causal attention through a fused kernel: Pallas' splash attention on TPUs, cuDNN's flash attention on GPUs.

The decoder's own attention (`llama._block_causal_attention`) writes every [T, S] score and probability of a
block to memory, four bytes each, and reads them back in the softmax and the backward pass. At the sequence
lengths pods train on (2,048 and up, 8 rows, 32 heads: GBs per layer) that traffic, not the products, sets
the attention's time. A flash kernel keeps each tile of scores in on-chip memory, skips the tiles the causal
mask leaves empty, and saves only a log-sum-exp per query for its backward pass.

What the kernels mask by: the causal order of slots, an optional sliding window (in slots), and one segment
id per token (`kernel_segments`). Padding becomes a segment of its own, so a real token never sees padding
and a padding token (which no loss reads) sees only padding, never an empty row. Splash takes the segment
ids themselves and skips the tiles they leave empty; cuDNN (through `jax.nn.dot_product_attention`) takes
them as a dense [B, 1, T, S] mask, which it reads as an additive bias.

On CPU splash runs in Pallas' interpreter and cuDNN's call as JAX's XLA reference of the same call (the test
suite checks both against transformers there); both are slower than the decoder's own attention, so the
`cpu` preset keeps that. The cuDNN path has not run on a GPU yet (no GPU was lent to this project's sessions):
`bench/train_mfu.py` tries it beside the decoder's own attention where one is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from eu_jax.parallel.sharding import BATCH_AXES, activation_mesh

# Query and key tile sizes tried in order; a sequence none of them divides runs the decoder's own attention.
SPLASH_BLOCKS = (512, 256, 128)
# Each kernel's backend, and what a forward's length must be a multiple of for it (splash: its smallest tile;
# cuDNN takes a mask at even lengths only).
KERNEL_BACKENDS = {"splash": "tpu", "cudnn": "gpu"}
LENGTH_MULTIPLES = {"splash": SPLASH_BLOCKS[-1], "cudnn": 2}
# The name of the kernel's output and log-sum-exp, which remat "dots" keeps so that the backward pass
# does not run the forward kernel again (`llama._REMAT_POLICIES`).
RESIDUALS = "fused_attention_residuals"


def splash_block(length: int) -> int | None:
    """The tile size splash attention uses for a `length`-token forward, or None when it cannot take it."""
    return next((block for block in SPLASH_BLOCKS if length % block == 0), None)


def uses_kernel(attention: str, length: int) -> bool:
    """Whether a forward without a KV cache of `length` tokens attends through a fused kernel."""
    return attention in LENGTH_MULTIPLES and length % LENGTH_MULTIPLES[attention] == 0


def attend(
    attention: str, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, scale: float, window: int | None
) -> jax.Array:
    """Causal attention of q [B,T,N,H] over k, v [B,K,T,H] (heads-first), masked by `segments` [B,T] -> [B,T,N,H],
    through the kernel `attention` names (where `uses_kernel` says it takes the forward)."""
    kernel = {"splash": _splash_attention, "cudnn": _cudnn_attention}[attention]
    return kernel(q, k, v, segments, scale, window)


def kernel_segments(valid: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """[B,T] int32 ids the kernel masks by: 0 for padding, and each packed example's own id above it."""
    ids = jnp.zeros(valid.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return jnp.where(valid, ids + 1, 0)


def _splash_kernel(heads: int, length: int, window: int | None, interpret: bool):
    """The kernel for `heads` query heads over `length` tokens, vectorised over rows: a function of q, k, v and
    the [rows, length] segment ids. Built in each trace: it holds its mask tables as arrays, which must not
    outlive the trace that made them."""
    # Imported here, not with the module: Pallas adds ~80 ms to the start of every command.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    if window is None:
        head_mask = splash_mask.CausalMask((length, length))
    else:  # a query sees itself and the window - 1 slots before it
        head_mask = splash_mask.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    block = splash_block(length)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1, block_sizes=sizes,
        residual_checkpoint_name=RESIDUALS, interpret=interpret,
    )
    batched = jax.vmap(kernel, in_axes=(0, 0, 0, splash.SegmentIds(q=0, kv=0)))
    return lambda q, k, v, segments: batched(q, k, v, splash.SegmentIds(q=segments, kv=segments))


def _backend_for(attention: str) -> str:
    """This process's backend, refusing a kernel of the other accelerator in one sentence."""
    backend, own = jax.default_backend(), KERNEL_BACKENDS[attention]
    if backend in KERNEL_BACKENDS.values() and backend != own:
        raise ValueError(f"runtime.attention: '{attention}' is a {own.upper()} kernel and this process runs on "
                         f"{backend.upper()}s; use 'xla'")
    return backend


def _splash_attention(q, k, v, segments, scale, window):
    """`attend` through splash attention (compiled on a TPU, interpreted on CPU).

    Inside a mesh (`activation_sharding`) each device runs the kernel on its own rows, and on its own heads
    when the `tensor` axis divides the KV heads: a Pallas call is opaque to XLA's partitioner, which would
    otherwise gather every row onto every device."""
    interpret = _backend_for("splash") != "tpu"
    q = jnp.swapaxes(q, 1, 2) * jnp.asarray(scale, q.dtype)  # [B,N,T,H]; the kernel does not scale

    def per_device(q, k, v, segments):
        return _splash_kernel(q.shape[1], q.shape[2], window, interpret)(q, k, v, segments)

    mesh = activation_mesh()
    if mesh is not None:
        rows = BATCH_AXES if q.shape[0] % np.prod([mesh.shape[a] for a in BATCH_AXES]) == 0 else None
        heads = "tensor" if k.shape[1] % mesh.shape["tensor"] == 0 else None
        spec = PartitionSpec(rows, heads)
        per_device = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(rows)),
                                   out_specs=spec, check_vma=False)
    return jnp.swapaxes(per_device(q, k, v, segments), 1, 2)


def _cudnn_attention(q, k, v, segments, scale, window):
    """`attend` through cuDNN's flash attention (on a GPU; JAX's XLA reference of the same call on CPU).

    XLA partitions the call itself (JAX gives it sharding rules over rows and heads), so no `shard_map`."""
    on_gpu = _backend_for("cudnn") == "gpu"
    if on_gpu and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"runtime.attention: 'cudnn' needs runtime.dtype bfloat16 or float16, not {q.dtype} "
                         "(cuDNN's flash attention has no float32 kernel)")
    same_segment = (segments[:, :, None] == segments[:, None, :])[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=same_segment, scale=scale, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn" if on_gpu else "xla",
    )
