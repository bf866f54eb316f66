# SPDX-License-Identifier: Apache-2.0
"""Write a local model folder (config.json + tokenizer) for weight-free runs."""

from __future__ import annotations

import json
from pathlib import Path

# Llama-3.x shapes.  Step costs depend on shapes only, never on weight values.
SHAPES: dict[str, dict[str, object]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
}
BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1


def write_model_dir(out: str | Path, shape: str = "tiny", *, vocab_size: int | None = None,
                    max_position_embeddings: int = 131072) -> Path:
    """Write ``config.json`` and a word-level tokenizer (tokens ``t0 .. t{V-1}``).

    Args:
        out: folder to write (created).
        shape: one of `SHAPES`.
        vocab_size: defaults to 1024 for ``tiny`` and 128256 otherwise.

    Returns:
        The folder, usable as vLLM's ``model=``.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if vocab_size is None:
        vocab_size = 1024 if shape == "tiny" else 128256
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=500000.0, hidden_act="silu", bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID, torch_dtype="bfloat16", attention_bias=False,
        mlp_bias=False, initializer_range=0.02,
    )
    config.update(SHAPES[shape])
    (out / "config.json").write_text(json.dumps(config, indent=1))

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=f"t{BOS_TOKEN_ID}", eos_token=f"t{EOS_TOKEN_ID}",
        unk_token="t0",
    ).save_pretrained(str(out))
    return out
