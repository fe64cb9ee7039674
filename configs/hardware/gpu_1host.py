"""One host with 8 GPUs (e.g. 8 x H100), one process (launch/gpu/single_host.sh, which makes fsdp=-1
to fit any GPU count; launch/gpu/slurm.sh for several such hosts).

FSDP over NVLink rather than tensor parallelism: for models up to 70B with batches of thousands of
tokens per device, gathering weights layer by layer costs less than per-matmul activation exchanges.
bf16 compute on the tensor cores, fp32 master weights and Adam state. train.peak_flops_per_device stays
0: MFU uses the peak of the detected device kind. Attention stays the decoder's own until cuDNN's flash
attention has been measured on a GPU: --config.runtime.attention=cudnn tries it (README, "Using the model from Python").
"""


def apply(config):
    config.mesh.update(data=1, fsdp=8, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    config.runtime.param_dtype = "float32"
    config.runtime.dtype = "bfloat16"
    config.train.async_checkpointing = True
