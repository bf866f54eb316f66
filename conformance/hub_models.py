# SPDX-License-Identifier: Apache-2.0
"""Local stand-ins for the hub models that vLLM's ``tests/v1/core`` names.

The scheduler tests read a model's configuration (architecture, context length,
layer shapes for KV sizing) and its tokenizer, never its weights.  Each folder
here holds the model's real ``config.json`` values that vLLM reads, a word-level
tokenizer of the model's vocabulary size (tokens ``t0 .. t{V-1}``) and, for the
multimodal models, the processor files vLLM's multimodal registry loads.
vLLM's ``VLLM_MODEL_REDIRECT_PATH`` maps each hub name to its folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LLAMA_7B_TEXT: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    vocab_size=32064, hidden_act="silu", rope_theta=10000.0, torch_dtype="float16",
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-125m": dict(
        architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272,
        hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
        activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
        bos_token_id=2, eos_token_id=2, pad_token_id=1, torch_dtype="float16",
        dropout=0.1, attention_dropout=0.0, init_std=0.02, layerdrop=0.0,
    ),
    "facebook/opt-350m": dict(
        architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272,
        hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
        max_position_embeddings=2048, word_embed_proj_dim=512, do_layer_norm_before=False,
        activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
        bos_token_id=2, eos_token_id=2, pad_token_id=1, torch_dtype="float16",
        dropout=0.1, attention_dropout=0.0, init_std=0.02, layerdrop=0.0,
    ),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": dict(
        architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=151936,
        hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        max_position_embeddings=262144, rms_norm_eps=1e-6, rope_theta=10000000.0,
        partial_rotary_factor=0.25, hidden_act="silu", attention_bias=False,
        attention_dropout=0.0, tie_word_embeddings=False, torch_dtype="bfloat16",
        bos_token_id=151643, eos_token_id=151645, full_attention_interval=4,
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=512,
        num_experts_per_tok=10, norm_topk_prob=True, mlp_only_layers=[],
        output_router_logits=False, router_aux_loss_coef=0.001, use_sliding_window=False,
        sliding_window=None, initializer_range=0.02,
    ),
    "hmellor/tiny-random-LlamaForCausalLM": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
        hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
        hidden_act="silu", rope_theta=10000.0, torch_dtype="float32",
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "Qwen/Qwen1.5-7B": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936,
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
        max_window_layers=28, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
        sliding_window=32768, use_sliding_window=False, tie_word_embeddings=False,
        torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643,
    ),
    "Qwen/Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, max_window_layers=28, rms_norm_eps=1e-6,
        rope_theta=1000000.0, hidden_act="silu", attention_bias=False,
        sliding_window=None, use_sliding_window=False, tie_word_embeddings=True,
        torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645,
    ),
    # Multimodal: the config.json of the hub repository (values vLLM and
    # transformers read), its processor files in ``EXTRA_FILES`` below.
    "llava-hf/llava-1.5-7b-hf": dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava",
        ignore_index=-100, image_token_index=32000, image_seq_length=576,
        pad_token_id=32001, projector_hidden_act="gelu", multimodal_projector_bias=True,
        text_config={k: v for k, v in LLAMA_7B_TEXT.items() if k != "pad_token_id"},
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=1024, image_size=336,
            intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
            patch_size=14, projection_dim=768, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, num_channels=3, vocab_size=32000,
        ),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False, torch_dtype="float16", vocab_size=32064,
    ),
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        vocab_size=151936, hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        max_position_embeddings=128000, max_window_layers=70, rms_norm_eps=1e-6,
        rope_theta=1000000.0, hidden_act="silu", attention_dropout=0.0,
        initializer_range=0.02, sliding_window=32768, use_sliding_window=False,
        use_cache=True, tie_word_embeddings=True, torch_dtype="bfloat16",
        bos_token_id=151643, eos_token_id=151645,
        vision_start_token_id=151652, vision_end_token_id=151653,
        vision_token_id=151654, image_token_id=151655, video_token_id=151656,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        vision_config=dict(
            depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420,
            num_heads=16, in_chans=3, out_hidden_size=2048, patch_size=14,
            spatial_merge_size=2, spatial_patch_size=14, window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
            temporal_patch_size=2,
        ),
    ),
}

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_SPECIAL_TOKENS: dict[str, int] = {
    text: 151643 + i for i, text in enumerate([
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
        "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
        "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
        "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>",
    ])
}

# Per model: special tokens of its tokenizer (text -> id) and the processor
# files (name -> JSON content) that transformers' AutoProcessor loads.
SPECIAL_TOKENS: dict[str, dict[str, int]] = {
    "llava-hf/llava-1.5-7b-hf": {"<image>": 32000, "<pad>": 32001},
    "Qwen/Qwen2.5-VL-3B-Instruct": QWEN2_SPECIAL_TOKENS,
}

EXTRA_FILES: dict[str, dict[str, Any]] = {
    "llava-hf/llava-1.5-7b-hf": {
        "preprocessor_config.json": dict(
            image_processor_type="CLIPImageProcessor", processor_class="LlavaProcessor",
            crop_size={"height": 336, "width": 336}, size={"shortest_edge": 336},
            do_center_crop=True, do_convert_rgb=True, do_normalize=True,
            do_rescale=True, do_resize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
            resample=3, rescale_factor=1 / 255,
        ),
        "processor_config.json": dict(
            processor_class="LlavaProcessor", image_token="<image>", patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
        ),
        "chat_template.json": {"chat_template": LLAVA_CHAT_TEMPLATE},
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "preprocessor_config.json": dict(
            image_processor_type="Qwen2VLImageProcessor",
            processor_class="Qwen2_5_VLProcessor", min_pixels=3136,
            max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
        ),
        "chat_template.json": {"chat_template": QWEN2_VL_CHAT_TEMPLATE},
    },
}


def write_tokenizer(out: Path, vocab_size: int, *, bos: int, eos: int,
                    extra: dict[str, int] | None = None) -> None:
    """A word-level tokenizer over ``t0 .. t{vocab_size-1}``; ``extra`` maps
    special token strings (``<image>``) to ids they replace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    for text, i in (extra or {}).items():
        del vocab[f"t{i}"]
        vocab[text] = i
    names = {i: text for text, i in vocab.items()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=names[bos], eos_token=names[eos], unk_token="t0",
        additional_special_tokens=list(extra or {}),
    )
    fast.save_pretrained(str(out))


def write_model(root: Path, name: str) -> Path:
    out = root / name.replace("/", "--")
    config = CONFIGS[name]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    text = config.get("text_config", config)
    write_tokenizer(out, config["vocab_size"], bos=text["bos_token_id"],
                    eos=text["eos_token_id"], extra=SPECIAL_TOKENS.get(name))
    for file, content in EXTRA_FILES.get(name, {}).items():
        (out / file).write_text(json.dumps(content, indent=1))
    return out


def write_hub_models(root: str | Path) -> Path:
    """Write every stand-in under ``root`` (once) and return the redirect file,
    a JSON object hub name -> folder, for ``VLLM_MODEL_REDIRECT_PATH``."""
    import fcntl

    root = Path(root)
    redirect = root / "redirect.json"
    stamp = root / ".complete"
    root.mkdir(parents=True, exist_ok=True)
    # One writer at a time (CI runs the conformance of two releases at once).
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == _fingerprint():
            return redirect
        folders = {name: str(write_model(root, name)) for name in CONFIGS}
        redirect.write_text(json.dumps(folders, indent=1))
        stamp.write_text(_fingerprint())
    return redirect


def _fingerprint() -> str:
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
