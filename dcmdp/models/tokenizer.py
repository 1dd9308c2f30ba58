"""A character-level tokenizer built locally with `tokenizers`, saved and loaded the Hugging Face way.

Nothing is downloaded: the vocabulary is a fixed character set plus special tokens. The result is a
``PreTrainedTokenizerFast`` with a chat template, so ``AutoTokenizer.from_pretrained(folder)`` and
vLLM load it like any other tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARS = "0123456789+-*/=<>?:;,.|()[] abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast`` (each character one token)."""
    # optional and heavy (the ml extra): the core imports without it
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(folder: Union[str, Path]):
    """A folder's tokenizer, left-padding. With no pad token (Llama-style) EOS pads (padding is
    masked, so which id pads does not matter); with no BOS (Qwen-style) prompts start without one.
    Raises ``ValueError`` when the tokenizer has no EOS token (a response could never end)."""
    # optional and heavy (the ml extra): the core imports without it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)  # never run a folder's code
    tok.padding_side = "left"
    if tok.eos_token_id is None:
        raise ValueError(f"spec.model: the tokenizer in {folder} has no eos_token (responses could never end)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
