"""SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, tied embeddings): the demo model,
small enough to train on a CPU in fp32 (the `cpu` hardware preset sets the dtypes).

model.checkpoint: `make demo` imports it once to ~/.cache/eu_jax/checkpoints/SmolLM2-135M-Instruct.Q4_1;
or `eu-convert import SmolLM2-135M-Instruct.Q4_1.gguf ckpt/smollm2_135m` and pass
`--config.model.checkpoint=ckpt/smollm2_135m`.
"""


def apply(config):
    config.model.checkpoint = ""  # yours: the output of `eu-convert import` (see above)
    config.runtime.remat = "dots"  # keep matmul outputs: a third of the memory of "none", and faster on CPU
    config.runtime.scan_layers = True  # one compiled layer instead of 30: much faster start-up
    config.data.max_length = 256
    config.data.batch_size = 8  # per half; divisible by 8 devices (gpu_1host, the 8-device CPU tests)
    config.optimizer.learning_rate = 5e-5  # small models take larger steps than the 1e-5 used at 7B
