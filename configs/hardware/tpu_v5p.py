"""A TPU v5p pod slice (launch/tpu/pod.sh): FSDP over every chip of the slice (ICI), bf16 compute on
the MXUs, fp32 master weights and Adam state (95 GB HBM per chip).

Several slices over the data-centre network (multislice): keep fsdp=-1 inside each slice and add
--config.mesh.dcn_data=<number of slices>, so only gradient all-reduces cross the slower DCN.

Every worker writes its own checkpoint shards: train.output_dir must be storage all workers mount at
the same path (NFS, or a bucket through Cloud Storage FUSE). data.batch_size must be a multiple of the chip count (the batch is split over
data x fsdp).
"""


def apply(config):
    config.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    config.runtime.param_dtype = "float32"
    config.runtime.dtype = "bfloat16"
    config.runtime.attention = "splash"  # fused flash attention (eu_jax/models/fused_attention.py)
    config.train.async_checkpointing = True
