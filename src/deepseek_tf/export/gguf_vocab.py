"""A run's tokenizer as GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys).

- A **byte-level BPE** tokenizer (`tokenizer.json`) becomes llama.cpp's `gpt2`
  model: its vocabulary and merges as they are, and the llama.cpp name of its
  pre-tokenizer (`PRE_TOKENIZERS`: the regex that splits text before merging),
  which llama.cpp cannot read from the file and must be named.
- A **character** tokenizer becomes llama.cpp's `rwkv` model: a plain
  longest-match over the token list with no implicit special tokens, which on a
  vocabulary of single characters is exactly one token per character. (`gpt2`
  and `llama` give fixed default BOS/EOS ids, which here would be characters.)

Vocabulary rows beyond the tokenizer's (a padded `model.vocab_size`) are written
as unused `[PAD<id>]` tokens.
"""

from __future__ import annotations

import json

from deepseek_tf.errors import InputError

# llama.cpp pre-tokenizer names, by what a `tokenizer.json` pre-tokenizer holds: the
# first Split regex of a Sequence (DeepSeek's published tokenizers), or a plain
# ByteLevel with its GPT-2 regex (the BPE `data.tokenizer: bpe` trains).
PRE_TOKENIZERS = {
    "\\p{N}{1,3}": "deepseek-v3",
    "[\r\n]": "deepseek-llm",
    "ByteLevel": "gpt-2",
}


def _pre_tokenizer_name(spec: dict | None) -> str:
    """The llama.cpp name of a `tokenizer.json` pre-tokenizer (InputError if unknown)."""
    spec = spec or {}
    key = None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        key = "ByteLevel"
    elif spec.get("type") == "Sequence":
        splits = [p for p in spec.get("pretokenizers", []) if p.get("type") == "Split"]
        if splits:
            key = splits[0].get("pattern", {}).get("Regex")
    if key not in PRE_TOKENIZERS:
        raise InputError(
            f"the tokenizer's pre-tokenizer ({spec.get('type', 'none')}"
            f"{'' if key is None else ' ' + repr(key)}) has no llama.cpp equivalent known "
            f"to deepseek-tf (known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))})"
        )
    return PRE_TOKENIZERS[key]


def _rwkv_escape(text: str) -> str:
    """llama.cpp's RWKV token escaping (backslash, \\n, \\r, \\t; other text as UTF-8)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _padded(tokens: list[str], types: list[int], vocab_size: int, unused: int):
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(unused)
    return tokens, types


def add_vocab(writer, tokenizer, vocab_size: int) -> str:
    """Writes `tokenizer`'s vocabulary to `writer` (a `gguf.GGUFWriter`) for a model of
    `vocab_size` rows; returns the llama.cpp tokenizer model written (`gpt2`, `rwkv`).

    Raises:
        InputError: no tokenizer, or one llama.cpp cannot express.
    """
    import gguf

    if tokenizer is None:
        raise InputError("the run has no tokenizer; a GGUF file must carry one")
    if tokenizer.kind == "char":
        tokens = [_rwkv_escape(c) for c in tokenizer.chars]
        types = [gguf.TokenType.NORMAL] * len(tokens)
        tokens, types = _padded(tokens, types, vocab_size, gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("rwkv")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        return "rwkv"
    if not tokenizer.hugging_face_format:
        raise InputError(f"a {tokenizer.kind} tokenizer has no GGUF equivalent")
    spec = json.loads(tokenizer.hf_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise InputError(f"a {model.get('type')} tokenizer.json model has no GGUF equivalent")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = added.get("special", False)
    tokens, types = [], []
    for i in range(min(vocab_size, max(by_id) + 1)):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in special:
            types.append(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    tokens, types = _padded(tokens, types, vocab_size, gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    # what the run's own prompts do (DeepSeek's post-processor prepends the BOS)
    probe = tokenizer.encode_prompt("a")
    writer.add_add_bos_token(bos is not None and probe[:1] == [bos])
    writer.add_add_eos_token(False)
    source = tokenizer.settings.chat_template
    if source is not None:
        writer.add_chat_template(source)
    return "gpt2"
