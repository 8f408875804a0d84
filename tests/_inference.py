"""A tiny, complete LLaVA model directory for inference tests: HF weights, tokenizer, image settings.

The vocabulary is laid out as llava-hf's: the sentencepiece pieces first, then `<image>`, then
padding rows, so that every id the tokenizer emits is a real embedding row.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import PIL.Image
import torch

from llava_jax.data.image import ImageProcessorConfig
from llava_jax.data.tokenizer import Tokenizer
from tests import _spm
from tests.hf_reference import NEXT_PINPOINTS, NEXT_TILE, make_next, perturb_, text_config_dict, vision_config_dict

SPM_VOCAB = 400
IMAGE_TOKEN = SPM_VOCAB  # right after the sentencepiece pieces, as 32000 in llava-hf
VOCAB = SPM_VOCAB + 16
IMAGE_SIZE = 28
NUM_IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2


def make_hf_llava(seed: int, *, max_positions: int = 256, eos: int = 2):
    """A perturbed tiny `LlavaForConditionalGeneration` (float32) with the vocabulary above."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = text_config_dict(vocab=VOCAB, layers=2, hidden=64, heads=4, kv_heads=2)
    text.update(max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=eos)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_config_dict(layers=2, image_size=IMAGE_SIZE)),
        text_config=LlamaConfig(**text),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return perturb_(LlavaForConditionalGeneration(cfg), seed)


def tokenizer_cache_dir() -> str:
    """Where the tiny tokenizer is trained once per machine; named by tests/_spm.py's text, so that a changed
    corpus or trainer setting trains a new one instead of reusing the old."""
    with open(_spm.__file__, "rb") as f:
        version = hashlib.sha256(f.read()).hexdigest()[:12]
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llava_jax_test_spm_{SPM_VOCAB}_{version}")


def make_model_dir(path: str, seed: int = 0, **kw) -> tuple[str, object]:
    """Save a tiny HF LLaVA with tokenizer.model and preprocessor_config.json into `path`."""
    model = make_hf_llava(seed, **kw)
    model.save_pretrained(path)
    spm_path = _spm.train_tiny_spm(tokenizer_cache_dir(), vocab_size=SPM_VOCAB)
    shutil.copy(spm_path, os.path.join(path, "tokenizer.model"))
    ImageProcessorConfig(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, pad_to_square=True).save(path)
    return path, model


def write_image(path: str, seed: int, size=(40, 30)) -> str:
    """A random RGB image file (non-square, so padding and cropping matter)."""
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def hf_generate(
    model, input_ids, pixels_nhwc=None, attention_mask=None, *, max_new_tokens: int, eos: int | None = None
):
    """transformers' greedy `generate`: (new ids [B, n], log-probs of those ids [B, n])."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kw = {"input_ids": ids}
    if pixels_nhwc is not None:
        kw["pixel_values"] = torch.as_tensor(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2).copy())
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            **kw,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=eos,
            pad_token_id=0,
        )
    new = out.sequences[:, ids.shape[1] :]
    logits = torch.stack(out.logits, dim=1).float()  # raw logits of each step [B, n, V]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])[..., 0]
    return new.numpy(), lp.numpy()


# --- LLaVA-NeXT (anyres): 28 px tiles of 2 x 2 features, the v1.6 pinpoints scaled to 28 px -----------------



def train_bpe_tokenizer(directory: str) -> tuple[str, int]:
    """A tiny Llama-3 style byte-level BPE `tokenizer.json` (no tokenizer.model) with `<image>` added after the
    vocabulary, as llama3-llava-next-8b ships it; returns (directory, the `<image>` id)."""
    from tests.test_tokenizers_hf import LLAMA3_REGEX, LLAMA3_SPECIAL, _train_byte_level, _write
    from tokenizers import processors

    tok = _train_byte_level(LLAMA3_REGEX, LLAMA3_SPECIAL)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    _write(directory, tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    return directory, tok.token_to_id("<image>")


def make_hf_next(seed: int, *, vocab: int, image_token: int, bos: int, eos: int, max_positions: int = 256):
    """A perturbed tiny `LlavaNextForConditionalGeneration` (float32, Llama text) with the given vocabulary."""
    from transformers import LlamaConfig

    text = text_config_dict(vocab=vocab, layers=2, hidden=64, heads=4, kv_heads=2)
    text.update(max_position_embeddings=max_positions, bos_token_id=bos, eos_token_id=eos, pad_token_id=0)
    return make_next(seed, text_config=LlamaConfig(**text), vision_layers=2, image_token=image_token)


def make_next_model_dir(path: str, seed: int = 0) -> tuple[str, object]:
    """A tiny llava-hf NeXT directory: HF weights, tokenizer.json only, LlavaNextImageProcessor's json."""
    from transformers import LlavaNextImageProcessor

    _, image_token = train_bpe_tokenizer(path)
    tok = Tokenizer.from_pretrained(path)
    model = make_hf_next(seed, vocab=image_token + 8, image_token=image_token, bos=tok.bos_id, eos=tok.eos_id)
    model.save_pretrained(path)
    LlavaNextImageProcessor(size={"shortest_edge": NEXT_TILE}, crop_size={"height": NEXT_TILE, "width": NEXT_TILE},
                            image_grid_pinpoints=NEXT_PINPOINTS).save_pretrained(path)
    return path, model


def hf_next_generate(model, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *,
                     max_new_tokens: int):
    """transformers' greedy `LlavaNextForConditionalGeneration.generate` without EOS: new ids [B, n].

    pixel_values [N, P, H, W, 3] channels last (zero patches as padding), image_sizes [N, 2] (height, width).
    """
    kw = {"input_ids": torch.as_tensor(np.asarray(input_ids), dtype=torch.long)}
    if pixel_values is not None:
        kw["pixel_values"] = torch.as_tensor(np.asarray(pixel_values).transpose(0, 1, 4, 2, 3).copy())
        kw["image_sizes"] = torch.as_tensor(np.asarray(image_sizes), dtype=torch.long)
    # Always a mask: generate would otherwise mask out every pad_token_id (0, the tiny BPE's BOS).
    mask = np.ones(np.shape(input_ids)) if attention_mask is None else attention_mask
    kw["attention_mask"] = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=None, pad_token_id=0)
    return out[:, kw["input_ids"].shape[1]:].numpy()
