"""kohya's layer choice and names on the real SD 1.5 / SDXL architectures (built on the meta device:
full size, no memory), and the peft config built from it."""
from __future__ import annotations

import pytest
import torch

from modules.training.images import lora_targets as lt


@pytest.fixture(scope="module")
def real():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        return {
            "sd15_unet": UNet2DConditionModel(cross_attention_dim=768),  # diffusers' defaults are SD 1.x's
            "sdxl_unet": UNet2DConditionModel(
                sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816),
            "clip_l": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12)),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280)),
        }


def test_layer_counts_match_sd_scripts(real):
    # sd-scripts logs 192 UNet + 72 TE modules for SD 1.5, 722 + 264 for SDXL; with conv_dim 278 / 788
    assert len(lt.unet_targets(real["sd15_unet"]).all) == 192
    assert len(lt.text_encoder_targets(real["clip_l"]).all) == 72
    assert len(lt.unet_targets(real["sdxl_unet"]).all) == 722
    assert len(lt.text_encoder_targets(real["clip_l"]).all) + len(lt.text_encoder_targets(real["clip_g"]).all) == 264
    sd15_conv = lt.unet_targets(real["sd15_unet"], conv=True)
    assert len(sd15_conv.all) == 278
    assert "down_blocks.0.resnets.0.time_emb_proj" in sd15_conv.linear  # a Linear: trained at the network rank
    assert "down_blocks.0.resnets.0.conv1" in sd15_conv.conv and "down_blocks.0.downsamplers.0.conv" in sd15_conv.conv
    assert len(lt.unet_targets(real["sdxl_unet"], conv=True).all) == 788


def test_sdxl_names_are_sgm_and_sd15_names_are_diffusers(real):
    xl = lt.kohya_names("unet", real["sdxl_unet"], sdxl=True)
    assert xl["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert xl["mid_block.attentions.0.transformer_blocks.9.ff.net.2"] == \
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"
    assert xl["up_blocks.0.attentions.2.proj_out"] == "lora_unet_output_blocks_2_1_proj_out"
    assert xl["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_2_2_conv"
    assert xl["down_blocks.0.downsamplers.0.conv"] == "lora_unet_input_blocks_3_0_op"
    assert xl["up_blocks.2.resnets.2.conv_shortcut"] == "lora_unet_output_blocks_8_0_skip_connection"
    assert xl["down_blocks.0.resnets.1.conv1"] == "lora_unet_input_blocks_2_0_in_layers_2"
    assert len(set(xl.values())) == len(xl)
    sd = lt.kohya_names("unet", real["sd15_unet"], sdxl=False)
    assert sd["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"] == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"
    te1 = lt.kohya_names("text_encoder", real["clip_l"], sdxl=True)
    te2 = lt.kohya_names("text_encoder_2", real["clip_g"], sdxl=True)
    assert te1["encoder.layers.11.mlp.fc1" if "encoder.layers.11.mlp.fc1" in te1
               else "text_model.encoder.layers.11.mlp.fc1"] == "lora_te1_text_model_encoder_layers_11_mlp_fc1"
    assert te2["text_model.encoder.layers.31.self_attn.out_proj"] == \
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"
    sd_te = lt.kohya_names("text_encoder", real["clip_l"], sdxl=False)
    assert all(name.startswith("lora_te_text_model_") for name in sd_te.values())
    with pytest.raises(lt.LoraTargetError, match="text_encoder_2"):
        lt.kohya_names("text_encoder_2", real["clip_g"], sdxl=False)


def test_lora_config_targets_exactly_and_checks_settings(real):
    targets = lt.unet_targets(real["sd15_unet"], conv=True)
    config = lt.lora_config(targets, rank=8, alpha=4.0, conv_rank=2)
    assert set(config.target_modules) == set(targets.all) and config.r == 8 and config.lora_alpha == 4.0
    assert len(config.rank_pattern) == len(targets.conv) and set(config.alpha_pattern.values()) == {1.0}
    with pytest.raises(lt.LoraTargetError) as info:
        lt.lora_config(targets, rank=0, alpha=1.0, conv_rank=None, dropout=1.5)
    message = str(info.value)
    assert "rank must be a positive integer, got 0" in message and "conv_rank" in message and "dropout" in message
