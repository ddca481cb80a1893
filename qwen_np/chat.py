"""Chat templates: a checkpoint's own Jinja template rendered the way transformers'
`apply_chat_template` renders it, so the token ids are the same; and the chat helper on top.

    messages = [{"role": "user", "content": "Hi!"}]
    reply = "".join(qwen_np.chat(model, messages, enable_thinking=False))
    thinking, answer = qwen_np.split_thinking(reply)

A template sees `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's named
special tokens (`bos_token`, `eos_token`, ...) and any extra keyword, such as Qwen3's
`enable_thinking`. Qwen2.5's default system prompt is written by its template itself.
"""

import dataclasses
import json
import reprlib
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache

import numpy as np
from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import QwenNPError
from .generate import check_model, check_unicode, encode, end_token_ids, generate_text, no_tokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the names transformers accepts, first wins
# apply_chat_template's own options, which render_chat would otherwise pass on as template variables
NOT_TEMPLATE_VARIABLES = ("continue_final_message", "chat_template", "tokenize", "return_dict", "return_tensors",
                          "padding", "truncation", "max_length", "return_assistant_tokens_mask",
                          "sanitize_control_tokens", "tokenizer_kwargs")


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own tojson: unlike Jinja's, it does not escape HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def plain_data(value):  # -> the same data made of JSON types only, as transformers gives it to a template
    # The template is code downloaded with the checkpoint, and an object's methods are reachable from
    # it (a Path's write_text...): it sees plain data only, anything else a placeholder naming its type.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # a subclass (np.str_, an Enum of str...): the string it holds, not its str()
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):  # np.float64 too
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, np.generic):  # np.False_ must stay false, np.float32(0.5) a number
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # a Pydantic model, such as the OpenAI SDK's messages
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"  # e.g. "<ndarray>"


def strftime_now(format):
    return datetime.now().strftime(format)


class GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=8)
def compile_template(source):  # -> jinja2.Template, the same object while `source` is among the last 8
    # Compiling takes 10-20 ms, rendering well under 1 ms: the last 8 templates are kept compiled,
    # as transformers keeps its last 128 (rendering does not change a template, so sharing it is safe).
    # A sandbox, because a template is code downloaded with the checkpoint; trim_blocks and
    # lstrip_blocks drop the newline and indentation around {% %} tags, as transformers does.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source)


def special_tokens(tokenizer_config):  # -> {"eos_token": "<|im_end|>", ...}, the names that are set
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = tokenizer_config.get(name)
        if value is None:
            continue
        text = value.get("content") if isinstance(value, dict) else value  # an AddedToken: {"content": ..., ...}
        if not isinstance(text, str):  # transformers refuses these too (a TypeError)
            raise QwenNPError(f"{name} in tokenizer_config.json must be a string or an AddedToken object "
                              f"({{\"content\": string, ...}}), got {reprlib.repr(value)}")
        check_unicode(text, f"{name} in tokenizer_config.json")
        tokens[name] = text
    return tokens


def chat_template_source(tokenizer_config, tools=None):  # -> the template's text
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # older files: a list of named templates
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t for t in template):
            raise QwenNPError("chat_template in tokenizer_config.json is a list, but not of {name, template} objects")
        named = {t["name"]: t["template"] for t in template}
        template = named.get("tool_use") if tools is not None and "tool_use" in named else named.get("default")
    if not template:
        raise QwenNPError("this checkpoint has no chat template (no chat_template in tokenizer_config.json and "
                          "no chat_template.jinja); use generate with a plain prompt instead")
    if not isinstance(template, str):
        raise QwenNPError(f"the chat template must be a string, found {type(template).__name__}")
    return template


def check_chat(messages, tools, documents):
    """messages: a list of dicts with a role; tools: None or a list of JSON schemas (dicts); documents: None
    or a list of dicts."""
    if not isinstance(messages, (list, tuple)):
        raise QwenNPError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}")
    if not messages:  # as transformers refuses it
        raise QwenNPError("the chat is empty: give at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise QwenNPError(f"message {i} must be a dict with a 'role' (and 'content'), got {message!r}")
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        raise QwenNPError("tools must be a list of JSON schemas (dicts); qwen_np does not build a schema from a "
                          "Python function, as transformers does from its type hints and docstring")
    if documents is not None and not (isinstance(documents, (list, tuple)) and all(isinstance(d, dict)
                                                                                  for d in documents)):
        raise QwenNPError(f"documents must be a list of dicts (such as {{'title': ..., 'text': ...}}), got "
                          f"{reprlib.repr(documents)}")


def normalise_message(message):  # -> a new dict, as transformers passes it to the template
    # Keys set to None are dropped (templates handle a missing key, not a None one), and a
    # message's reasoning is offered under each name a template may read.
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(tokenizer_config, messages, add_generation_prompt=False, tools=None, documents=None, **kwargs):
    """The chat as the template writes it (a string), like apply_chat_template(..., tokenize=False).

    messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}, ...]
    add_generation_prompt: end with the header of an assistant turn, for the model to write it.
    kwargs: more template variables, e.g. enable_thinking=False for Qwen3.
    """
    if not isinstance(tokenizer_config, dict):
        raise QwenNPError(f"render_chat takes a model's tokenizer_config (model.tokenizer_config, a dict), "
                          f"got {type(tokenizer_config).__name__}")
    if isinstance(messages, (list, tuple)):  # messages that are dataclasses or Pydantic models become dicts
        messages = plain_data(messages)
    check_chat(messages, tools, documents)
    for name in NOT_TEMPLATE_VARIABLES:
        if name in kwargs:
            raise QwenNPError(f"{name} is an option of transformers' apply_chat_template that render_chat does not "
                              f"have; its keyword arguments are template variables (such as enable_thinking)")
    source = chat_template_source(tokenizer_config, tools)
    # The caller's values win. Everything the template sees is plain data (see plain_data): a NumPy
    # scalar becomes its Python value (Jinja's `x is false` holds for False only, not for np.False_).
    variables = {**special_tokens(tokenizer_config), **plain_data(kwargs)}
    try:
        template = compile_template(source)
    except Exception as e:  # TemplateError, or Python's own limits (SyntaxError: too deeply nested, RecursionError)
        problem = e if isinstance(e, TemplateError) else repr(e)
        raise QwenNPError(f"the chat template is not valid Jinja: {problem}") from None
    try:
        return template.render(messages=[normalise_message(m) for m in messages], tools=plain_data(tools),
                               documents=plain_data(documents), add_generation_prompt=add_generation_prompt,
                               **variables)
    except Exception as e:  # the template is the checkpoint's code: whatever it raises, it failed
        raise QwenNPError(f"the chat template failed: {e if isinstance(e, TemplateError) else repr(e)}") from None


def chat_ids(model, messages, add_generation_prompt=False, **kwargs):  # -> list[int]
    """The token ids of the rendered chat, like apply_chat_template(..., tokenize=True). The
    template writes the special tokens as text; the tokenizer adds none of its own."""
    check_model(model, "chat_ids")
    if model.tokenizer is None:
        raise QwenNPError(f"{no_tokenizer(model)}, so it cannot encode a chat")
    text = render_chat(model.tokenizer_config, messages, add_generation_prompt, **kwargs)
    return encode(model, text, "the chat", add_special_tokens=False)


def split_thinking(text):  # -> (thinking, answer)
    """Splits a Qwen3 reply "<think>\\n...\\n</think>\\n\\nanswer" into its two parts at the first
    </think>, stripped of newlines as the template strips them; thinking is "" when there is none,
    answer "" while still thinking. (The template, re-reading an earlier reply, keeps only what
    follows the last </think>; here an answer that writes </think> again keeps it.)"""
    if not isinstance(text, str):
        raise QwenNPError(f"split_thinking takes the reply as one string (\"\".join the pieces chat yields), "
                          f"got {type(text).__name__}")
    if "</think>" in text:
        thinking, answer = text.split("</think>", 1)
        return thinking.split("<think>")[-1].strip("\n"), answer.lstrip("\n")
    if text.lstrip().startswith("<think>"):  # cut off before the thinking ended
        return text.lstrip()[len("<think>"):].strip("\n"), ""
    return "", text


def chat(model, messages, enable_thinking=None, tools=None, eos_token_id=None, **kwargs):
    """Yields the assistant's reply to `messages` as text pieces (see `generate_text`).

    enable_thinking: Qwen3 only; False asks for the answer without thinking (None: the template's
    default, which thinks). Generation ends at the checkpoint's end tokens and at the tokenizer's
    eos_token (<|im_end|> in Qwen chat models). Other keyword arguments are those of `generate`;
    past=stats.past from the previous turn reuses the KV cache of the conversation so far.
    Returns (as StopIteration.value) a GenerationStats.
    """
    check_model(model, "chat")
    if enable_thinking is not None and not isinstance(enable_thinking, (bool, np.bool_)):
        raise QwenNPError(f"enable_thinking must be True, False or None, got {enable_thinking!r}")
    variables = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = chat_ids(model, messages, add_generation_prompt=True, tools=tools, **variables)
    ends = end_token_ids(model, eos_token_id)
    eos_token = special_tokens(model.tokenizer_config).get("eos_token")
    if eos_token is not None and model.tokenizer.token_to_id(eos_token) is not None:
        ends.add(model.tokenizer.token_to_id(eos_token))
    return (yield from generate_text(model, ids, eos_token_id=sorted(ends), **kwargs))
