"""Hugging Face model folders as users have them, built in seconds inside a test (random weights).

* :func:`qwen_style`: byte-level BPE trained with ``tokenizers``, **no BOS**, ``<|endoftext|>`` pad,
  ``<|im_end|>`` EOS, a ChatML chat template, a Qwen3 model whose embedding is **padded** beyond the
  tokenizer (as Qwen's 151,936 rows vs ~151,665 tokens), weights saved in **bf16**.
* :func:`llama_style`: byte-level BPE with ``<s>`` BOS, ``</s>`` EOS, **no pad token**, a Llama
  chat template, a Llama model.

And :func:`gsm8k_jsonl`: a GSM8K-format dataset (worked solution, then ``#### answer``).
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def gsm8k_problems(n: int = 48) -> list[dict[str, str]]:
    """Small word problems in GSM8K's format: the answer is a worked solution ending ``#### N``."""
    out = []
    for i in range(n):
        a, b = 3 + i % 7, 2 + (5 * i) % 9
        out.append({"prompt": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                    "answer": f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}"})
    return out


def gsm8k_jsonl(folder: Path, n: int = 48) -> Path:
    path = folder / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in gsm8k_problems(n)))
    return path


def _bpe(specials: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p["prompt"] + " " + p["answer"] for p in gsm8k_problems(200)] + ["\\boxed{42} 0123456789 #### = + -"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def qwen_style(folder: Path, *, pad_vocab_to: int = 448, context: int = 512) -> Path:
    """A Qwen3-style folder; returns it. The embedding has ``pad_vocab_to`` rows > len(tokenizer)."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    bpe = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    tok.chat_template = QWEN_TEMPLATE
    assert tok.bos_token is None and len(tok) < pad_vocab_to
    config = Qwen3Config(vocab_size=pad_vocab_to, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                         max_position_embeddings=context, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def llama_style(folder: Path, *, context: int = 512) -> Path:
    """A Llama-style folder (BOS, no pad token); returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = _bpe(["<s>", "</s>", "<unk>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = LLAMA_TEMPLATE
    assert tok.pad_token is None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                         max_position_embeddings=context, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder
