"""U-Net configs of the Stable Diffusion shapes the benchmarks use (random weights, no download)."""

SD15_UNET = dict(  # Stable Diffusion 1.5: 512 px images, 64 x 64 latents
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD21_UNET = dict(  # Stable Diffusion 2.1: 768 px images, 96 x 96 latents
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
