"""Real diffusers/transformers classes, tiny configs, random weights, no download.

``tiny_flux_pipeline()`` is the embedded default of the main job: a
``FluxPipeline`` whose transformer, VAE, CLIP and T5 encoders are built from
small configs with seeded random weights, and whose tokenizers are word-level
tokenizers built in memory. Every rank that calls it with the same seed gets
the same weights, so a parallel run can be checked against a single process.
"""

from __future__ import annotations

import torch

FLUX_DEV_TRANSFORMER = dict(  # FLUX.1-dev's transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56))

WAN21_14B_TRANSFORMER = dict(  # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024)

TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=8, joint_attention_dim=32, pooled_projection_dim=32,
    guidance_embeds=True, axes_dims_rope=(4, 6, 6))

_WORDS = ("a photo of cat dog tree house red blue green small large city night day "
          "mountain river sky sun moon car bird flower painting portrait landscape").split()


def _word_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(_WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", model_max_length=max_length)


def _text_encoders(clip: dict, t5: dict):
    """CLIP and T5 encoders over the word-level vocabulary, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = len(_WORDS) + 3
    return (CLIPTextModel(CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77,
                                         projection_dim=clip["hidden_size"], pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2, **clip)),
            T5EncoderModel(T5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=2, **t5)))


def for_inference(pipe):
    """Put every module in eval mode, as ``from_pretrained`` does: modules built from a
    config start in training mode, where T5's dropout makes two calls differ."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    clip, t5 = _text_encoders(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4),
                              dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                        use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=_word_tokenizer(77), text_encoder_2=t5,
                        tokenizer_2=_word_tokenizer(512), transformer=transformer)
    for_inference(pipe)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


FLUX_DEV_VAE = dict(  # FLUX.1-dev's vae/config.json
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=1024, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
    use_post_quant_conv=False, force_upcast=True)


def flux_dev_random_pipeline(seed: int = 0, device: str = "cuda", dtype=torch.bfloat16,
                             transformer_cls=None):
    """FluxPipeline with FLUX.1-dev's real transformer and VAE configs, random weights.

    The text encoders keep the real output widths (CLIP pooled 768, T5 4096)
    but have one layer and a word-level vocabulary: they only feed the
    transformer, and latency of a denoising step does not depend on them.
    The transformer (12B parameters) is initialised directly on ``device``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    clip, t5 = _text_encoders(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                   num_attention_heads=12),
                              dict(d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=64))
    vae = AutoencoderKL(**FLUX_DEV_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    torch.manual_seed(seed + 1)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = (transformer_cls or FluxTransformer2DModel)(**FLUX_DEV_TRANSFORMER)
    finally:
        torch.set_default_dtype(torch.float32)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=_word_tokenizer(77),
                        text_encoder_2=t5, tokenizer_2=_word_tokenizer(512), transformer=transformer)
    return for_inference(pipe).to(device=device, dtype=dtype)
