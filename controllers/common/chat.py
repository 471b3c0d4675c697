"""Conversations rendered with the tokenizer's chat template, loss on assistant tokens.

Every assistant turn of a multi-turn conversation is trained, and nothing else: the system and
user turns and the template's own tokens around them are context. The assistant spans come
from rendering the conversation up to each turn (``add_generation_prompt`` before it, the turn
included after it), which needs a template whose renderings of a conversation's prefixes are
prefixes of its rendering: one that is not is refused by name. A span ends with the template's
end-of-turn token (trained: the model must learn to stop); what the template adds after it
(a newline) is not trained.
"""
from __future__ import annotations

from ...actors.packing import SftExample


class TemplateError(ValueError):
    """The chat template cannot mark assistant tokens by prefix rendering."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                              tokenize=True, return_dict=False))


def render_conversation(tokenizer, messages: list[dict], system_prompt: str | None = None,
                        tools: list[dict] | None = None) -> SftExample:
    """The conversation's token ids and its assistant-token mask. ``system_prompt`` goes first
    unless the conversation starts with a system turn of its own; ``tools`` (JSON schemas) are
    rendered by the template as in the GRPO prompts, so a warm-up's tool-calling traces see the
    tools the policy will be offered. Raises ValueError for a
    conversation without an assistant turn, TemplateError for a template that is not
    prefix-stable."""
    msgs = list(messages)
    if system_prompt and (not msgs or msgs[0].get("role") != "system"):
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    if not any(m.get("role") == "assistant" for m in msgs):
        raise ValueError("the conversation has no assistant turn (nothing to train on)")
    ids = _render(tokenizer, msgs, generation_prompt=False, tools=tools)
    trained = [0] * len(ids)
    eos = tokenizer.eos_token_id
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        start = len(_render(tokenizer, msgs[:i], generation_prompt=True, tools=tools)) if i else 0
        upto = _render(tokenizer, msgs[:i + 1], generation_prompt=False, tools=tools)
        if ids[:len(upto)] != upto or start > len(upto):
            raise TemplateError("the chat template renders a conversation's first turns differently from the whole "
                                "conversation, so assistant tokens cannot be told apart; accepted: a prefix-stable "
                                "template (Qwen, Llama 3, ChatML style)")
        end = len(upto)
        span = upto[start:end]
        if eos is not None and eos in span:  # stop after the end-of-turn token: the newline after it is layout
            end = start + len(span) - span[::-1].index(eos)
        trained[start:end] = [1] * (end - start)
    last = len(trained) - trained[::-1].index(1)  # what follows the last trained token changes no loss
    return SftExample(ids[:last], trained[:last])
