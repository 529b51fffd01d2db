"""Tiny configs of the three SD families, and torch reference models built from them.

Random weights are perturbed away from diffusers' initialisation (zero-initialised output
projections, unit norms) so that a mis-mapped weight shows up in the outputs.
"""
import torch

SD1 = dict(  # conv proj_in/proj_out, heads from attention_head_dim
    block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
)
SD2 = dict(  # linear projections, per-level head counts, upcast attention
    block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4, 4), norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True,
)
SDXL = dict(  # no attention at the top level, several transformer layers, text_time embedding
    block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4, 4), norm_num_groups=8,
    transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
FAMILIES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
SDXL_TEXT_EMBEDS = 16


def torch_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
