"""The built-in tiny tokenizer and tokenizer loading.

The tiny tokenizer is character-level: every character of the built-in tasks' text is one token,
and the chat tags (<think>, </think>, <answer>, </answer>) plus <pad>/<bos>/<eos>/<unk> are single
special tokens. Why character-level: the arithmetic tasks need one token per digit so that a
0.8M-parameter model can learn carries (benchmarks/RESULTS.md), and 85 tokens keep the LM head tiny.
It is saved as a Hugging Face tokenizer.json, so `PreTrainedTokenizerFast` loads it like any other.
"""
from __future__ import annotations

import os
import string

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>", "<answer>", "</answer>"]
CHARS = list(string.digits) + list("+-*/=().,:?!' \n") + list(string.ascii_lowercase) + list(string.ascii_uppercase)

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def builtin_path(name: str = "tiny") -> str:
    """Folder of a built-in model config + tokenizer shipped in reasonrl/assets/ (no weights)."""
    path = os.path.join(_ASSETS, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        known = sorted(d for d in os.listdir(_ASSETS) if os.path.isdir(os.path.join(_ASSETS, d)))
        raise ValueError(f"builtin_path: unknown built-in model {name!r}; known: {known}")
    return path


def build_tiny_tokenizer():
    """A PreTrainedTokenizerFast over SPECIAL_TOKENS + CHARS (ids in that order)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One piece per character, newline included ("." would skip "\n").
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join pieces with no separator, so decode(encode(s)) == s
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:], clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def load_tokenizer(path: str):
    """A transformers PreTrainedTokenizerFast from a local folder (tokenizer.json + tokenizer_config.json).

    Local files only: no network, no remote code.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_tokenizer: path {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"load_tokenizer: no tokenizer.json in {path!r}")
    file = os.path.join(path, "tokenizer.json")
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):  # its eos, pad and chat template matter: a broken one must not be skipped
        import json
        try:
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"load_tokenizer: {cfg_file} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"load_tokenizer: {cfg_file} must be a JSON object, got {type(cfg).__name__}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError):
        pass  # a tokenizer_config.json naming a class we do not have: the tokenizer.json alone suffices
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed tokenizer.json
        raise ValueError(f"load_tokenizer: cannot load {file}: {e}") from e
    try:
        return PreTrainedTokenizerFast(tokenizer_file=file)
    except Exception as e:
        raise ValueError(f"load_tokenizer: cannot load {file} (not a valid tokenizer.json?): {e}") from e
