"""How a task's prompt text becomes the token ids every engine samples from (``spec.task.chatTemplate``).

One function, used by the trainer for training prompts, held-out evaluation and the warm start, so
the trainer, every rollout engine (which receive token ids, never text) and evaluation see the same
tokens:

* ``none``: ``[BOS] + tokens(prompt)`` — BOS only when the tokenizer has one (Qwen tokenizers do
  not; Llama's do).
* ``tokenizer``: the tokenizer's own chat template over ``[{system}, {user: prompt}]`` with the
  generation prompt added (``<|im_start|>assistant\\n`` for Qwen). The rendered text already holds
  whatever BOS the template writes, so no special tokens are added when encoding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class PromptFormat:
    """``chat_template``: "none" | "tokenizer"; ``system_prompt`` only with "tokenizer"."""

    chat_template: str = "none"
    system_prompt: Optional[str] = None

    def text(self, tokenizer: Any, prompt: str) -> str:
        """The prompt as the model reads it (the chat template rendered, or the raw text)."""
        if self.chat_template == "none":
            return prompt
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("spec.task.chatTemplate: 'tokenizer' but the model's tokenizer has no chat_template")
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else [])
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """Prompt token ids (list of int, never None entries, at least one).

        Raises ValueError naming ``spec.task`` when the formatted prompt has no token (an empty
        prompt without a chat template or BOS): the model would be asked to continue nothing."""
        if self.chat_template == "none":
            bos = tokenizer.bos_token_id
            ids = ([bos] if bos is not None else []) + encode(tokenizer, prompt)
        else:
            ids = encode(tokenizer, self.text(tokenizer, prompt))
        if not ids:
            raise ValueError(f"spec.task: the prompt {prompt[:60]!r} has no tokens once formatted; "
                             "give every prompt some text")
        return ids


def prompt_format(task_spec: Any) -> PromptFormat:
    """The format ``spec.task`` asks for."""
    return PromptFormat(task_spec.chat_template, task_spec.system_prompt)
