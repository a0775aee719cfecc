"""A small byte-level BPE tokenizer with DeepSeek-V3's special tokens, its
`tokenizer_config.json` settings (BOS added, `<｜end▁of▁sentence｜>` as EOS) and a chat
template in DeepSeek-V3's format (`deepseek_v3_chat.jinja`)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SPECIAL = [
    BOS,
    EOS,
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
TEMPLATE = (Path(__file__).parent / "deepseek_v3_chat.jinja").read_text(encoding="utf-8")
TEXT = (
    "You are a helpful assistant. What is the weather in Zürich today? It is sunny. "
    "Call the tool get_weather with the city. The answer is 42. Thank you, goodbye.\n"
) * 20


def _added(content: str) -> dict:
    """An `AddedToken` as DeepSeek's `tokenizer_config.json` spells it."""
    flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", "content": content, **flags}


def write_deepseek_tokenizer(directory: Path, vocab_size: int = 400, **settings) -> Path:
    """Writes `tokenizer.json` + `tokenizer_config.json` into `directory`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    # As DeepSeek's tokenizer.json: encoding with special tokens prepends the BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _added(BOS),
        "eos_token": _added(EOS),
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 16384,
        "chat_template": TEMPLATE,
        **settings,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return directory
