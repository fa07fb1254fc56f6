"""pipe.enable_parallel on a tiny random-weight FluxPipeline, gloo ranks on CPU.

Each rank first runs the unparallelised pipeline (the reference), then builds
the same pipeline again, enables a strategy, and must produce the same
latents; the tiny config has joint text tokens (16) that diffusers' Flux plan
shards along with the image tokens (256).
"""

import pytest
import torch

from dist_harness import rel_err, run_ranks

PROMPT = "a photo of a red car at night"


def _run(pipe, seed):
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                generator=torch.Generator().manual_seed(seed), output_type="latent")


def _latents(pipe, seed):
    return _run(pipe, seed).images


def _check_strategies(rank, world, strategies, seed):
    import swiftfusion_xdit  # noqa: F401  (adds pipe.enable_parallel)
    from swiftfusion_xdit import diffusers_integration
    from swiftfusion_xdit.tiny import tiny_flux_pipeline

    calls = []
    attention = diffusers_integration.torus_attention
    diffusers_integration.torus_attention = lambda *a, **k: calls.append(1) or attention(*a, **k)
    reference = _latents(tiny_flux_pipeline(seed), seed)
    for strategy in strategies:
        calls.clear()
        pipe = tiny_flux_pipeline(seed).enable_parallel(strategy, output_on_all_ranks=True)
        err = rel_err(_latents(pipe, seed), reference)
        assert err < 1e-4, f"{strategy}: rel err {err:.2e} ({pipe.parallel_layout.describe()})"
        # diffusers' own context parallelism would match too: it must have been ours
        assert len(calls) == 2 * 4, f"{strategy}: {len(calls)} Torus Attention calls, not 2 steps x 4 blocks"
    # a pipeline run before it is split gives the same result after (eval mode: no dropout)
    pipe = tiny_flux_pipeline(seed)
    _latents(pipe, seed)
    err = rel_err(_latents(pipe.enable_parallel("torus", output_on_all_ranks=True), seed), reference)
    assert err < 1e-4, f"torus after an unparallelised run: rel err {err:.2e}"
    pipe = tiny_flux_pipeline(seed).enable_parallel("torus")
    out = _run(pipe, seed)
    assert (out is None) == (rank != 0), "only rank 0 returns the result by default"


def test_every_strategy_matches_single_process_1x4():
    run_ranks(_check_strategies, 1, 4, ("torus", "ulysses", "ring", "usp"), 3)


def _check_head_chunks(rank, world, seed):
    from swiftfusion_xdit.tiny import tiny_flux_pipeline
    reference = _latents(tiny_flux_pipeline(seed), seed)
    pipe = tiny_flux_pipeline(seed).enable_parallel("torus", head_chunks=2, output_on_all_ranks=True)
    groups = pipe.transformer._parallel_config.context_parallel_config.sp_groups
    assert groups.head_chunks == 2
    err = rel_err(_latents(pipe, seed), reference)
    assert err < 1e-4, f"torus head_chunks=2: rel err {err:.2e}"


def test_head_chunked_torus_matches_single_process_1x4():
    run_ranks(_check_head_chunks, 1, 4, 7)


def test_torus_and_usp_match_on_two_emulated_machines():
    run_ranks(_check_strategies, 2, 2, ("torus", "usp", "auto"), 5)


def _check_each_exchange(rank, world, seed):
    from swiftfusion_xdit.tiny import tiny_flux_pipeline
    reference = _latents(tiny_flux_pipeline(seed), seed)
    for exchange in ("a2a", "kv"):
        pipe = tiny_flux_pipeline(seed).enable_parallel("torus", torus_exchange=exchange, output_on_all_ranks=True)
        assert pipe.parallel_layout.torus_exchange == exchange
        err = rel_err(_latents(pipe, seed), reference)
        assert err < 1e-4, f"torus_exchange={exchange}: rel err {err:.2e}"


def test_the_torus_exchange_can_be_chosen_and_each_matches_single_process():
    run_ranks(_check_each_exchange, 2, 2, 9)


def _check_errors(rank, world):
    from diffusers import SD3Transformer2DModel
    from swiftfusion_xdit import LayoutError, enable_parallel
    from swiftfusion_xdit.diffusers_integration import parallelize_transformer
    from swiftfusion_xdit.tiny import tiny_flux_pipeline

    with pytest.raises(ValueError, match="unknown strategy 'zigzag'"):
        enable_parallel(tiny_flux_pipeline(), "zigzag")
    with pytest.raises(LayoutError, match="ulysses degree 3 does not divide the sequence-parallel size 4"):
        enable_parallel(tiny_flux_pipeline(), "torus", ulysses=3)
    with pytest.raises(LayoutError, match="6 attention heads are not divisible by ulysses degree 4"):
        parallelize_transformer(_with_heads(tiny_flux_pipeline().transformer, 6), "torus", ulysses=4)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=16, out_channels=4)
    with pytest.raises(ValueError, match="SD3Transformer2DModel has no context-parallel plan"):
        parallelize_transformer(sd3, "torus")
    for strategy, degrees, message in (("ulysses", dict(ulysses=2), "'ulysses' means ulysses=4 on 4 ranks"),
                                       ("ring", dict(torus=2), "'ring' means torus=4 on 4 ranks"),
                                       ("auto", dict(ulysses=4), "'auto' picks the degrees itself")):
        with pytest.raises(LayoutError, match=message + ", so .* cannot be honoured"):
            enable_parallel(tiny_flux_pipeline(), strategy, **degrees)
    with pytest.raises(ValueError, match=r"head_chunks=3 must divide the 2 heads each of the 4 ranks"):
        enable_parallel(tiny_flux_pipeline(), "torus", head_chunks=3)
    with pytest.raises(ValueError, match="with a torus degree of 4 the torus steps overlap already"):
        enable_parallel(tiny_flux_pipeline(), "ring", head_chunks=2)
    with pytest.raises(ValueError, match="torus_exchange='a2a' applies to strategy 'torus' only"):
        enable_parallel(tiny_flux_pipeline(), "usp", torus_exchange="a2a")
    with pytest.raises(ValueError, match="unknown comm 'infiniband'"):
        enable_parallel(tiny_flux_pipeline(), "torus", comm="infiniband")
    pipe = enable_parallel(tiny_flux_pipeline(), "torus")
    with pytest.raises(RuntimeError, match="FluxTransformer2DModel is already parallel"):
        enable_parallel(pipe, "usp")
    # 60x64: 15 x 16 = 240 image tokens, and 6 text tokens: 4 ranks cannot share the text equally
    with pytest.raises(ValueError, match=r"encoder_hidden_states, txt_ids cannot be split evenly over 4 ranks; "
                                         r"rank counts that split every sequence \(6 and 240 tokens\): \[2, 3, 6\]"):
        pipe(PROMPT, height=60, width=64, num_inference_steps=1, max_sequence_length=6,
             output_type="latent")
    # Wan's plan splits its rotary embedding's output: 3 x 3 x 3 = 27 video tokens over 4 ranks
    wan = _tiny_wan(0)
    parallelize_transformer(wan, "torus")
    with pytest.raises(ValueError, match=r"^WanTransformer3DModel: a sequence its context-parallel plan splits "
                                         r"cannot be split evenly over 4 ranks"):
        wan(hidden_states=torch.randn(1, 4, 3, 6, 6), timestep=torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 8, 32), return_dict=False)
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="DDPMPipeline has no transformer to split"):
        enable_parallel(DDPMPipeline(unet, DDPMScheduler()), "torus")


def _with_heads(transformer, heads):
    transformer.register_to_config(num_attention_heads=heads)
    return transformer


def test_bad_arguments_are_explained():
    run_ranks(_check_errors, 1, 4)


def _tiny_wan(seed):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                 in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 eps=1e-6, rope_max_seq_len=32).eval()


def _every_strategy_matches(build, kwargs, strategies, name):
    """Each strategy's sharded model gives the unparallelised model's output."""
    from swiftfusion_xdit.diffusers_integration import parallelize_transformer
    with torch.no_grad():
        reference = build()(**kwargs)[0]
        for strategy in strategies:
            model = build()
            layout = parallelize_transformer(model, strategy)
            err = rel_err(model(**kwargs)[0], reference)
            assert err < 1e-4, f"{name} {strategy}: rel err {err:.2e} ({layout.describe()})"


def _check_wan(rank, world, strategies, seed):
    """Wan: self-attention is sharded (3 frames x 4 x 4 = 48 video tokens), cross-attention
    to the text stays local; every strategy must give the unparallelised output."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)
    _every_strategy_matches(lambda: _tiny_wan(seed), kwargs, strategies, "wan")


def test_wan_matches_single_process_on_two_emulated_machines():
    run_ranks(_check_wan, 2, 2, ("torus", "ulysses", "ring", "usp"), 11)


def _check_compiled(rank, world, seed):
    import swiftfusion_xdit  # noqa: F401
    from swiftfusion_xdit.tiny import tiny_flux_pipeline
    reference = _latents(tiny_flux_pipeline(seed), seed)
    pipe = tiny_flux_pipeline(seed).enable_parallel("torus", output_on_all_ranks=True)
    pipe.transformer = torch.compile(pipe.transformer)
    err = rel_err(_latents(pipe, seed), reference)
    assert err < 1e-4, f"compiled torus: rel err {err:.2e}"
    # regional compilation: each transformer block compiled, Torus Attention inside it,
    # diffusers' sequence split and gather hooks outside
    pipe = tiny_flux_pipeline(seed).enable_parallel("torus", output_on_all_ranks=True)
    pipe.transformer.compile_repeated_blocks()
    err = rel_err(_latents(pipe, seed), reference)
    assert err < 1e-4, f"torus with compiled blocks: rel err {err:.2e}"


def test_torus_under_torch_compile_on_two_emulated_machines():
    """torch.compile traces the model around Torus Attention's collectives (inductor on CPU),
    whole or block by block (``compile_repeated_blocks``)."""
    run_ranks(_check_compiled, 2, 1, 13)


def _tiny_qwen_image(seed):
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=4,
                                       joint_attention_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def _check_qwen_image(rank, world, strategies, seed):
    """Qwen-Image: diffusers' plan shards text (8 tokens) and image (64) tokens, and each
    rank's joint attention sees [its text, its image]; every strategy must give the
    unparallelised output, also with a text padding mask (a batch of two prompts of
    different lengths), which reaches attention as a key-padding mask."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(hidden_states=torch.randn(1, 64, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  timestep=torch.tensor([0.5]), img_shapes=[(1, 8, 8)], return_dict=False)
    _every_strategy_matches(lambda: _tiny_qwen_image(seed), kwargs, strategies, "qwen-image")
    padded = torch.ones(2, 8, dtype=torch.bool)
    padded[0, 3:] = False  # the first prompt is 3 tokens long: ranks 2 and 3 hold only padding
    two = dict(kwargs, hidden_states=torch.randn(2, 64, 16, generator=g),
               encoder_hidden_states=torch.randn(2, 8, 32, generator=g), timestep=torch.tensor([0.5, 0.5]),
               img_shapes=[(1, 8, 8)] * 2, encoder_hidden_states_mask=padded)
    _every_strategy_matches(lambda: _tiny_qwen_image(seed), two, strategies, "qwen-image padded prompts")


def test_qwen_image_matches_single_process_on_two_emulated_machines():
    run_ranks(_check_qwen_image, 2, 2, ("torus", "ulysses", "ring", "usp"), 13)


def _tiny_flux2(seed):
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                   timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)).eval()


def _check_flux2(rank, world, strategies, seed):
    """FLUX.2: text (8 tokens) and image (64) sharded by diffusers' plan, with their 4-axis
    position ids; every strategy must give the unparallelised output."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(1, 64, 4)
    img_ids[0, :, 2], img_ids[0, :, 3] = torch.arange(64) // 8, torch.arange(64) % 8
    txt_ids = torch.zeros(1, 8, 4)
    txt_ids[0, :, 0] = torch.arange(8)
    kwargs = dict(hidden_states=torch.randn(1, 64, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]), return_dict=False)
    _every_strategy_matches(lambda: _tiny_flux2(seed), kwargs, strategies, "flux2")


def test_flux2_matches_single_process_on_two_emulated_machines():
    run_ranks(_check_flux2, 2, 2, ("torus", "ulysses", "ring", "usp"), 17)


def _tiny_ltx(seed):
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=4,
                                      attention_head_dim=16, cross_attention_dim=64, num_layers=2,
                                      caption_channels=32).eval()


def _check_ltx(rank, world, strategies, seed):
    """LTX-Video: diffusers' plan shards the video (32 tokens) and the text (8), so its
    cross-attention joins sharded queries to sharded keys of another length, under an
    additive padding bias; every strategy must give the unparallelised output, for a batch
    whose first prompt is 3 tokens long (ranks 2 and 3 hold only its padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 8)
    mask[0, 3:] = 0
    kwargs = dict(hidden_states=torch.randn(2, 32, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 8, 32, generator=g), timestep=torch.tensor([500, 500]),
                  encoder_attention_mask=mask, num_frames=2, height=4, width=4, return_dict=False)
    with torch.no_grad():
        unpadded = _tiny_ltx(seed)(**dict(kwargs, encoder_attention_mask=torch.ones(2, 8)))[0]
        assert rel_err(_tiny_ltx(seed)(**kwargs)[0][0], unpadded[0]) > 1e-3, "the padding must matter"
    _every_strategy_matches(lambda: _tiny_ltx(seed), kwargs, strategies, "ltx-video")
    # in bfloat16 the model's padding bias is -9984, which must still read as padding
    from swiftfusion_xdit.diffusers_integration import parallelize_transformer
    bf16 = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        reference = _tiny_ltx(seed).bfloat16()(**bf16)[0]
        model = _tiny_ltx(seed).bfloat16()
        parallelize_transformer(model, "torus")
        err = rel_err(model(**bf16)[0], reference)
    assert err < 2e-2, f"ltx-video bf16 torus: rel err {err:.2e}"


def test_ltx_video_matches_single_process_on_two_emulated_machines():
    run_ranks(_check_ltx, 2, 2, ("torus", "ulysses", "ring", "usp"), 19)


def _check_video_models(rank, world, strategies, seed):
    """ChronoEdit (32 video tokens, Wan-like), Helios with its history latents (116 tokens
    split at each attention and feed-forward; its plan names 40 blocks) and MiniMax-H3
    (text, audio and video packed into one sequence): every strategy must give the
    unparallelised output."""
    from diffusers import ChronoEditTransformer3DModel, HeliosTransformer3DModel, MiniMaxH3Transformer3DModel
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    tiny = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64)
    video = dict(hidden_states=r(1, 4, 2, 8, 8), timestep=torch.tensor([500]),
                 encoder_hidden_states=r(1, 8, 32), return_dict=False)

    def built(cls, **config):
        def build():
            torch.manual_seed(seed)
            return cls(**config).eval()
        return build

    _every_strategy_matches(built(ChronoEditTransformer3DModel, **tiny, num_layers=2, rope_max_seq_len=32),
                            video, strategies, "chronoedit")
    at = lambda a, b: torch.arange(a, b)[None]
    history = dict(video, indices_hidden_states=at(7, 9), latents_history_short=r(1, 4, 1, 16, 16),
                   indices_latents_history_short=at(6, 7), latents_history_mid=r(1, 4, 2, 16, 16),
                   indices_latents_history_mid=at(4, 6), latents_history_long=r(1, 4, 4, 16, 16),
                   indices_latents_history_long=at(0, 4))
    _every_strategy_matches(built(HeliosTransformer3DModel, **tiny, num_layers=40, rope_dim=(8, 4, 4)),
                            history, strategies, "helios")
    text, audio, frames = 8, 8, (2, 4, 4)
    positions = torch.zeros(text + audio + 32, 3, dtype=torch.long)
    positions[:text, 0], positions[text:text + audio, 0] = torch.arange(text), torch.arange(audio)
    positions[text + audio:] = torch.stack(torch.meshgrid(*map(torch.arange, frames), indexing="ij"), -1).flatten(0, 2)
    step = torch.ones(text + audio + 32, dtype=torch.long)
    step[:text] = step[text + audio:text + audio + 16] = 0  # text and the first frame are clean
    packed = dict(hidden_states=r(1, 32, 16), audio_hidden_states=r(1, audio, 8),
                  encoder_hidden_states=r(1, text, 32), timestep=torch.tensor([0.0, 0.6]),
                  timestep_indices=step, position_ids=positions,
                  token_tags=torch.tensor([1] * text + [2] * audio + [0] * 32),
                  text_indices=torch.arange(text), audio_indices=torch.arange(text, text + audio),
                  video_indices=torch.arange(text + audio, text + audio + 32), return_dict=False)
    _every_strategy_matches(built(MiniMaxH3Transformer3DModel, num_attention_heads=4, attention_head_dim=16,
                                  hidden_size=48, num_layers=2, num_refiner_layers=1, ffn_dim=64,
                                  in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=32,
                                  freq_dim=32, time_embed_hidden_dim=48, time_embed_dim=32, rope_freq_dim=2),
                            packed, strategies, "minimax-h3")


def test_chronoedit_helios_minimax_match_single_process_on_two_emulated_machines():
    run_ranks(_check_video_models, 2, 2, ("torus", "ulysses", "ring", "usp"), 23)


def test_models_whose_diffusers_plan_is_broken_are_refused():
    from diffusers import HeliosTransformer3DModel, LTX2VideoTransformer3DModel
    from swiftfusion_xdit.diffusers_integration import parallelize_transformer
    ltx2 = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                       attention_head_dim=8, cross_attention_dim=16, audio_in_channels=8,
                                       audio_out_channels=8, audio_num_attention_heads=2,
                                       audio_attention_head_dim=8, audio_cross_attention_dim=16,
                                       num_layers=1, caption_channels=8)
    with pytest.raises(ValueError, match="LTX2VideoTransformer3DModel is not supported: .*cross_attn_rope"):
        parallelize_transformer(ltx2, "torus")
    helios = HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                      in_channels=4, out_channels=4, text_dim=8, freq_dim=8, ffn_dim=8,
                                      num_layers=1, rope_dim=(8, 4, 4), is_amplify_history=True)
    with pytest.raises(ValueError, match="is_amplify_history=True is not supported: .*history keys"):
        parallelize_transformer(helios, "torus")


def test_only_key_padding_masks_reach_torus_attention():
    from swiftfusion_xdit.diffusers_integration import _key_padding
    keep = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.equal(_key_padding(keep[:, None, None, :], 2, 3), keep)
    assert _key_padding(keep[:1], 2, 3).shape == (2, 3)  # one mask for the whole batch
    assert torch.equal(_key_padding(keep[:1], 2, 3), keep[:1].expand(2, 3))
    additive = (1 - keep.float()) * -10000.0  # LTX's bias, repeated over 4 heads
    assert torch.equal(_key_padding(additive[:, None, None, :].expand(2, 4, 1, 3), 2, 3), keep)
    assert torch.equal(_key_padding(additive.masked_fill(~keep, float("-inf")), 2, 3), keep)
    in_bf16 = (1 - keep.to(torch.bfloat16)) * -10000.0  # -9984 in bfloat16
    assert torch.equal(_key_padding(in_bf16[:, None, None, :], 2, 3), keep)
    assert _key_padding(torch.full((2, 1, 1, 3), -0.5), 2, 3) is None  # a bias, not padding
    per_head = additive[:, None, None, :].repeat(1, 2, 1, 1)
    per_head[0, 1, 0, 0] = -10000.0
    assert _key_padding(per_head, 2, 3) is None  # heads differ
    assert _key_padding(torch.ones(2, 1, 4, 3, dtype=torch.bool), 2, 3) is None  # per query
    assert _key_padding(torch.ones(2, 1, 1, 5, dtype=torch.bool), 2, 3) is None  # other keys


def _tiny_wan_pipeline(seed):
    """WanPipeline from configs: the tiny Wan transformer (16 latent channels), a tiny Wan
    VAE, a 2-layer UMT5 over the word-level tokenizer; random weights, nothing downloaded."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    from swiftfusion_xdit.tiny import _WORDS, _word_tokenizer, for_inference
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        eps=1e-6, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(_WORDS) + 3, d_model=32, d_kv=8, d_ff=64,
                                               num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2))
    pipe = WanPipeline(tokenizer=_word_tokenizer(64), text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    return for_inference(pipe)


def _check_wan22_pipeline(rank, world, seed):
    """Wan 2.2's two-expert pipeline: transformer (high noise) and transformer_2 (low noise,
    after boundary_ratio) are both split, and together match the unparallelised pipeline."""
    import swiftfusion_xdit  # noqa: F401
    from diffusers import WanPipeline

    def two_experts():
        one, other = _tiny_wan_pipeline(seed), _tiny_wan_pipeline(seed + 1)
        return WanPipeline(tokenizer=one.tokenizer, text_encoder=one.text_encoder, vae=one.vae,
                           scheduler=one.scheduler, transformer=one.transformer,
                           transformer_2=other.transformer, boundary_ratio=0.5)
    run = lambda pipe: pipe(PROMPT, height=64, width=64, num_frames=5, num_inference_steps=2,
                            max_sequence_length=16, generator=torch.Generator().manual_seed(seed),
                            output_type="latent").frames
    reference = run(two_experts())
    pipe = two_experts().enable_parallel("torus", output_on_all_ranks=True)
    assert pipe.transformer_2._parallel_config is not None, "transformer_2 left unsplit"
    err = rel_err(run(pipe), reference)
    assert err < 1e-4, f"wan 2.2 pipeline: rel err {err:.2e}"


def test_wan22_two_experts_are_both_split():
    run_ranks(_check_wan22_pipeline, 2, 2, 29)


def _check_wan_pipeline(rank, world, strategies, seed):
    """The whole WanPipeline (text-to-video, classifier-free guidance: two transformer calls
    per step) with pipe.enable_parallel: 5 frames of 64x64 = 32 video tokens per call."""
    import swiftfusion_xdit  # noqa: F401  (adds pipe.enable_parallel)
    run = lambda pipe: pipe(PROMPT, height=64, width=64, num_frames=5, num_inference_steps=2,
                            max_sequence_length=16, generator=torch.Generator().manual_seed(seed),
                            output_type="latent").frames
    reference = run(_tiny_wan_pipeline(seed))
    for strategy in strategies:
        pipe = _tiny_wan_pipeline(seed)
        pipe.enable_parallel(strategy=strategy, output_on_all_ranks=True)
        err = rel_err(run(pipe), reference)
        assert err < 1e-4, f"wan pipeline {strategy}: rel err {err:.2e}"


def test_wan_pipeline_matches_single_process_on_two_emulated_machines():
    run_ranks(_check_wan_pipeline, 2, 2, ("torus", "usp"), 23)


@pytest.mark.parametrize("current,visible,expected", [(0, 4, [1]), (3, 4, []), (0, 1, [0])],
                         ids=["none-chosen", "caller-chose", "one-gpu-per-process"])
def test_a_caller_initialised_group_gets_a_device_only_if_it_chose_none(monkeypatch, current, visible,
                                                                        expected):
    """A script that ran init_process_group without choosing a device leaves every rank on
    GPU 0 (NCCL refuses duplicate GPUs): LOCAL_RANK's is taken; a device it chose is kept;
    a process shown only its own GPU keeps GPU 0. CUDA is mocked: this CPU test covers the
    choice, not a GPU."""
    import torch
    from swiftfusion_xdit import diffusers_integration as di
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1] if chosen else current)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(di.dist, "is_initialized", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    device = di.ensure_distributed()
    assert chosen == expected and device == torch.device("cuda", expected[0] if expected else current)


def test_a_local_rank_past_the_visible_gpus_is_refused(monkeypatch):
    import torch
    from swiftfusion_xdit import diffusers_integration as di
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but this process sees 2 GPUs"):
        di._local_device(3)
