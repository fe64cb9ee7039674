"""A CPU host (tests, the SmolLM2 demo): all its devices on the fsdp axis, fp32 throughout, async
checkpoints so a save does not stall the next steps. Not bf16: even on CPUs with AMX, XLA's CPU backend
keeps bf16 speed only for products with fp32 results whose left operand is contracted on its last axis;
every weight gradient is contracted on its first axis and runs as fp32, so a bf16 train step is no faster
(BENCHMARKS.md, findings: bf16 compute).

The loss's log-probs go at most 256 tokens at a time (1024 elsewhere): XLA's CPU runtime maps a step's
temporaries afresh on every execution, so each chunk's [chunk, vocab] logits and their gradient are new
pages that the kernel zeroes in every step. On the SmolLM2 EU step (4 + 4 rows of 256 tokens) whole
1024-token chunks spent ~3 s of a 10 s step in the kernel; 256-token chunks 0.8 s, for 9.1-9.3 s a step
and 0.5 GB less peak memory (BENCHMARKS.md, train step findings)."""


def apply(config):
    config.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    config.runtime.param_dtype = "float32"
    config.runtime.dtype = "float32"
    config.train.async_checkpointing = True
    config.objective.chunk_tokens = 256
