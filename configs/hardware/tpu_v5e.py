"""A TPU v5e (v5litepod) slice (launch/tpu/pod.sh --accelerator=v5litepod-16 ...): as tpu_v5p, FSDP
over every chip, bf16 compute, fp32 master weights, but with 16 GB HBM per chip instead of 95, so
activations are always rematerialised (only each layer's input is kept).

Multislice: --config.mesh.dcn_data=<number of slices>. train.output_dir and the checkpoint on storage
every worker mounts; data.batch_size a multiple of the chip count.
"""


def apply(config):
    config.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    config.runtime.param_dtype = "float32"
    config.runtime.dtype = "bfloat16"
    config.runtime.attention = "splash"  # fused flash attention (eu_jax/models/fused_attention.py)
    config.runtime.remat = "full"  # 16 GB per chip: overrides the model preset's lighter choice
    config.train.async_checkpointing = True
