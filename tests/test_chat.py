"""Chat templates and tokenizers against the real Qwen2.5 and Qwen3 tokenizer files in ../shared/data:
our template rendering gives the ids of transformers' apply_chat_template, our loaded tokenizer
gives the reference token ids, and incremental decoding never splits a character."""

import dataclasses
import enum
import json
import random
import re
import shutil

import numpy as np
import pytest
from conftest import require_reference
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tiny import tiny_model, write_vocab_and_merges

import qwen_np
from qwen_np.chat import render_chat
from qwen_np.config import read_json
from qwen_np.generate import decode_rest, decode_step
from qwen_np.weights import load_tokenizer

TOKENIZERS = ["qwen2.5-tokenizer", "qwen3-tokenizer"]


@pytest.fixture(scope="module")
def qwen3_tokenizer(shared_data):
    return load_tokenizer(shared_data / "qwen3-tokenizer")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. 北京 <city>"}},
                   "required": ["city"]}}}

CHATS = {
    "user only": [{"role": "user", "content": "What is the capital of France?"}],
    "with system": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "你好！Say hi 👋"}],
    "multi-turn": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Name a prime.\nJust one."}],
    "multi-turn with system and old thinking": [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"}],
    "tool call": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21}"}],
}


def tokenizer_only(directory):  # -> a Model with the tokenizer files of `directory` and no weights
    return qwen_np.Model(config=None, params=None, tokenizer=load_tokenizer(directory), generation_config={},
                         tokenizer_config=read_json(directory / "tokenizer_config.json"), path=directory)


@pytest.fixture(scope="module")
def tokenizers(shared_data):
    """{name: (transformers' tokenizer, our Model-like holder)} for both real tokenizers."""
    _, transformers = require_reference()
    out = {}
    for name in TOKENIZERS:
        directory = shared_data / name
        out[name] = (transformers.AutoTokenizer.from_pretrained(str(directory)), tokenizer_only(directory))
    return out


def reference_ids(tokenizer, messages, **kwargs):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


TEMPLATE_CASES = [(name, thinking) for name in TOKENIZERS
                  for thinking in ([None, True, False] if name == "qwen3-tokenizer" else [None])]


@pytest.mark.parametrize("name, thinking", TEMPLATE_CASES)  # enable_thinking: a Qwen3 template variable
@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, None])  # None: left out, False in both
def test_chat_ids_equal_apply_chat_template(tokenizers, name, chat, thinking, add_generation_prompt):
    reference, ours = tokenizers[name]
    messages = CHATS[chat]
    kwargs = {} if add_generation_prompt is None else {"add_generation_prompt": add_generation_prompt}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    if chat == "tool call":
        kwargs["tools"] = [WEATHER_TOOL]
    expected = reference_ids(reference, messages, **kwargs)
    assert qwen_np.chat_ids(ours, messages, **kwargs) == expected
    assert render_chat(ours.tokenizer_config, messages, **kwargs) == reference.apply_chat_template(
        messages, tokenize=False, **kwargs)


TRICKY_TEXTS = ["Hi", "", "你好！Say hi 👋", "two\nlines\n", "<think>\nhmm\n</think>\n\nok", "a</think>b",
                "<tool_call>x</tool_call>", "<tool_response>\n{\"t\": 21}\n</tool_response>", "<|im_start|>", "  pad  "]


def random_chat(rng):  # -> (messages, apply_chat_template's keyword arguments) of a random conversation
    # What clients send: system or not, several turns, reasoning under any of its names, one or two
    # tool calls (OpenAI's {"type", "function"} form or the bare function, arguments a dict or JSON
    # text), consecutive tool responses, content left empty or None, the last turn the assistant's.
    def text():
        return rng.choice(TRICKY_TEXTS)

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": text()})
        reply = {"role": "assistant", "content": text()}
        if rng.random() < 0.3:
            reply[rng.choice(["reasoning_content", "thinking", "reasoning"])] = text()
        if rng.random() < 0.3:
            arguments = [{"x": 1}, {"x": "北京"}, {}, "{\"x\": 2}"]
            calls = [{"name": rng.choice(["f0", "f1"]), "arguments": rng.choice(arguments)}
                     for _ in range(rng.randint(1, 2))]
            reply["tool_calls"] = [{"type": "function", "function": c} if rng.random() < 0.7 else c for c in calls]
            reply["content"] = rng.choice([reply["content"], "", None])
            messages += [reply] + [{"role": "tool", "content": text()} for _ in range(rng.randint(1, 2))]
            reply = {"role": "assistant", "content": text()}
        messages.append(reply)
    if rng.random() < 0.5:
        messages.pop()  # end on the tool's or the user's turn
    kwargs = {"add_generation_prompt": rng.random() < 0.7} if rng.random() < 0.7 else {}
    if rng.random() < 0.3:
        kwargs["tools"] = [dict(WEATHER_TOOL, function=dict(WEATHER_TOOL["function"], name=f"f{i}"))
                           for i in range(rng.randint(1, 2))]
    return messages, kwargs


@pytest.mark.parametrize("name, thinking", TEMPLATE_CASES)
def test_random_chats_give_the_ids_of_apply_chat_template(tokenizers, name, thinking):
    # Where the template itself fails (for Qwen3's, a content of None), both fail.
    reference, ours = tokenizers[name]
    rng = random.Random(name + str(thinking))
    for case in range(60):
        messages, kwargs = random_chat(rng)
        if thinking is not None:
            kwargs["enable_thinking"] = thinking
        described = f"case {case}: {json.dumps(messages, ensure_ascii=False)}, {kwargs}"
        try:
            expected = reference_ids(reference, messages, **kwargs)
        except Exception as e:  # jinja2's errors, as transformers lets them through
            with pytest.raises(qwen_np.QwenNPError, match="the chat template failed"):
                qwen_np.chat_ids(ours, messages, **kwargs)
            assert "jinja2" in type(e).__module__, described
            continue
        assert qwen_np.chat_ids(ours, messages, **kwargs) == expected, described


def test_chat_ids_add_no_special_tokens_of_the_tokenizers_own(shared_data, tmp_path):
    # A tokenizer whose post-processor adds a BOS (as Llama 3's does): the template writes what the chat
    # needs, and apply_chat_template encodes it with add_special_tokens=False, adding nothing.
    _, transformers = require_reference()
    shutil.copytree(shared_data / "qwen3-tokenizer", tmp_path, dirs_exist_ok=True)
    tokenizer = json.loads((tmp_path / "tokenizer.json").read_text("utf-8"))
    tokenizer["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer), "utf-8")
    ours = tokenizer_only(tmp_path)
    assert ours.tokenizer.encode("Hi").ids[0] == 151643  # the post-processor's BOS
    messages = CHATS["user only"]
    expected = reference_ids(transformers.AutoTokenizer.from_pretrained(str(tmp_path)), messages)
    assert qwen_np.chat_ids(ours, messages) == expected and 151643 not in expected


def test_templates_write_what_the_checkpoints_expect(tokenizers):
    _, qwen25 = tokenizers["qwen2.5-tokenizer"]
    _, qwen3 = tokenizers["qwen3-tokenizer"]
    user = CHATS["user only"]
    text = render_chat(qwen25.tokenizer_config, user, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")  # the default system prompt
    assert text.endswith("<|im_start|>assistant\n")
    no_think = render_chat(qwen3.tokenizer_config, user, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    old = render_chat(qwen3.tokenizer_config, CHATS["multi-turn with system and old thinking"])
    assert "Two and two" not in old  # the template drops the thinking of earlier turns
    ids = qwen_np.chat_ids(qwen3, user, add_generation_prompt=True)
    assert ids[0] == 151644 and ids.count(151645) == 1  # <|im_start|>, <|im_end|> as single special tokens


def test_a_missing_or_failing_template_is_a_clear_error(tokenizers):
    _, ours = tokenizers["qwen3-tokenizer"]
    with pytest.raises(qwen_np.QwenNPError, match="no chat template"):
        render_chat({}, CHATS["user only"])
    failing = {"chat_template": "{{ raise_exception('only user messages, please') }}"}
    with pytest.raises(qwen_np.QwenNPError, match="only user messages, please"):
        render_chat(failing, CHATS["user only"])
    assert render_chat({"chat_template": "{{ '%Y' | length }} {{ strftime_now('%Y') | length }} "
                                        "{{ {'a': '<é>'} | tojson }} {{ eos_token }}", "eos_token": "<|im_end|>"},
                       CHATS["user only"]) == '2 4 {"a": "<é>"} <|im_end|>'


HI = [{"role": "user", "content": "Hi"}]
BAD_CHATS = [  # (tokenizer_config, messages, tools, the error's words)
    ({"chat_template": "{% for %}"}, HI, None, "the chat template is not valid Jinja"),
    ({"chat_template": "{{ x | no_such_filter }}"}, HI, None, "the chat template is not valid Jinja"),
    ({"chat_template": 5}, HI, None, "the chat template must be a string, found int"),
    ({"chat_template": ["default"]}, HI, None, "a list, but not of {name, template} objects"),
    ({"chat_template": [{"name": ["default"], "template": "x"}]}, HI, None, "a list, but not of {name, template}"),
    ({"chat_template": "{% for a in b %}" * 25 + "{% endfor %}" * 25}, HI, None,  # Python's nesting limit
     "the chat template is not valid Jinja: SyntaxError"),
    ({"chat_template": "{{ 1 / 0 }}"}, HI, None, "the chat template failed: ZeroDivisionError"),
    ("{{ messages }}", HI, None, "render_chat takes a model's tokenizer_config (model.tokenizer_config, a dict), "
                                 "got str"),
    ({"chat_template": "{{ messages }}"}, "Hello", None, "messages must be a list"),
    ({"chat_template": "{{ messages }}"}, [], None, "the chat is empty: give at least one message"),
    ({"chat_template": "{{ messages }}"}, [{"content": "Hello"}], None, "message 0 must be a dict with a 'role'"),
    ({"chat_template": "{{ messages }}"}, ["Hello"], None, "message 0 must be a dict with a 'role'"),
    ({"chat_template": "{{ tools }}"}, HI, [print], "tools must be a list of JSON schemas"),
    ({"chat_template": "{{ messages }}", "eos_token": "\ud800"}, HI, None,  # valid JSON: "\\ud800"
     "eos_token in tokenizer_config.json is not valid Unicode text: it holds a lone surrogate"),
    ({"chat_template": "{{ eos_token }}", "eos_token": 5}, HI, None,  # not the text "5" (nor a token id)
     "eos_token in tokenizer_config.json must be a string or an AddedToken object ({\"content\": string, ...}), "
     "got 5"),
    *(({"chat_template": "{{ bos_token }}", "bos_token": token}, HI, None,
       f"bos_token in tokenizer_config.json must be a string or an AddedToken object ({{\"content\": string, ...}}), "
       f"got {token!r}") for token in ({"content": ["<s>"]}, {"content": None}, {"text": "<s>"})),
]


@pytest.mark.parametrize("tokenizer_config, messages, tools, message", BAD_CHATS)
def test_bad_templates_messages_and_tools_are_clear_errors(tokenizer_config, messages, tools, message):
    with pytest.raises(qwen_np.QwenNPError, match=re.escape(message)):
        render_chat(tokenizer_config, messages, tools=tools)
    with pytest.raises(qwen_np.QwenNPError, match=re.escape("documents must be a list of dicts")):
        render_chat({"chat_template": "{{ documents }}"}, HI, documents=["a text"])


def test_template_variables_are_plain_python_values():
    # Jinja's `is false` is an identity test: np.False_ must arrive as False, as transformers passes it.
    template = {"chat_template": "{% if enable_thinking is false %}off{% else %}on{% endif %}"}
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(template, messages, enable_thinking=np.bool_(False)) == "off"
    assert render_chat(template, messages, enable_thinking=np.bool_(True)) == "on"


def test_a_template_is_compiled_once_and_renders_afresh_each_time(monkeypatch):
    compiled = []
    real = ImmutableSandboxedEnvironment.from_string
    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string",
                        lambda env, source: compiled.append(source) or real(env, source))
    # A source no other test uses, so that this test's first render is the first compile.
    counter = {"chat_template": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                                "{% endfor %}{{ ns.n }} messages (test_a_template_is_compiled_once)"}
    hi = {"role": "user", "content": "Hi"}
    assert render_chat(counter, [hi]) == "1 messages (test_a_template_is_compiled_once)"
    assert render_chat(counter, [hi, hi, hi]) == "3 messages (test_a_template_is_compiled_once)"  # no state kept
    assert render_chat(dict(counter), [hi]).startswith("1 messages")  # an equal config: the same template
    assert len(compiled) == 1


def test_named_templates_pick_tool_use_whenever_tools_are_given():
    named = {"chat_template": [{"name": "default", "template": "default"}, {"name": "tool_use", "template": "tools"}]}
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(named, messages) == "default"
    assert render_chat(named, messages, tools=[]) == "tools"  # as transformers: tools is not None


@pytest.mark.parametrize("option", ["continue_final_message", "tokenize", "chat_template"])
def test_apply_chat_template_options_are_not_taken_for_template_variables(option):
    with pytest.raises(qwen_np.QwenNPError, match=f"{option} is an option of transformers' apply_chat_template"):
        render_chat({"chat_template": "{{ messages }}"}, [{"role": "user", "content": "Hi"}], **{option: True})


class Color(str, enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Message:  # a message object, as chat libraries make them
    role: str
    content: object


def rich_chat(tmp_path):  # -> (messages, tools, variables) holding objects a caller may pass, not plain data
    call = {"name": Color.RED, "arguments": {"a": np.int64(2), "b": np.float32(0.5), "c": np.arange(2),
                                            "d": (np.bool_(False), Color.RED)}}
    messages = [Message("user", np.str_("Hi\x00!")), {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "content": [np.float64(0.5)], "attachment": tmp_path / "pwned.txt"}]
    return messages, [{"name": Color.RED, "parameters": {"x": np.int32(1)}}], {"flag": np.bool_(False)}


RICH_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}"
                 "{% endif %} {{ m.attachment }}|{% endfor %}{{ tools | tojson }} {{ flag is false }}")


def test_the_template_sees_plain_data_only(tmp_path):
    # A template is code from the checkpoint: it must not reach the methods of the caller's objects.
    messages, tools, variables = rich_chat(tmp_path)
    text = render_chat({"chat_template": RICH_TEMPLATE}, messages, tools=tools, **variables)
    path = f"<{type(tmp_path).__name__}>"  # the Path's type, in place of the Path
    assert text == ('user: Hi\x00! |assistant: [{"name": "red", "arguments": {"a": 2, "b": 0.5, "c": "<ndarray>", '
                    f'"d": [false, "red"]}}}}] |tool: [0.5] {path}|[{{"name": "red", "parameters": {{"x": 1}}}}] True')
    with pytest.raises(qwen_np.QwenNPError, match="the chat template failed"):
        render_chat({"chat_template": "{{ messages[2].attachment.write_text('x') }}"}, messages)
    assert not (tmp_path / "pwned.txt").exists()


class Level(enum.IntEnum):
    HIGH = 2


class Reply:  # what a Pydantic model offers a caller: model_dump() gives its fields as a dict
    def model_dump(self):
        return {"role": "assistant", "content": Level.HIGH}


def test_int_enums_and_pydantic_models_reach_the_template_as_plain_data():
    # An IntEnum arrives as the int it holds (no .name), a Pydantic model as the dict of its fields.
    template = {"chat_template": "{{ messages[0].role }} {{ messages[0].content }}{{ messages[0].content.name }} "
                                 "{{ level + 1 }}{{ level.name }}"}
    assert render_chat(template, [Reply()], level=Level.HIGH) == "assistant 2 3"


def test_generation_tags_render_what_they_enclose():
    # {% generation %} marks the assistant's text for transformers' return_assistant_tokens_mask:
    # templates written for training have it, and rendering gives the text inside
    template = {"chat_template": "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}"
                                 "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}"}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_chat(template, messages) == "user: Hi|assistant: Hello|"


def test_the_template_sees_what_transformers_gives_it(tmp_path):
    _, transformers = require_reference()
    messages, tools, variables = rich_chat(tmp_path)
    theirs = transformers.utils.chat_template_utils.render_jinja_template(
        [messages], tools=tools, chat_template=RICH_TEMPLATE, **variables)[0][0]
    assert render_chat({"chat_template": RICH_TEMPLATE}, messages, tools=tools, **variables) == theirs


# Written as many checkpoints write theirs: block tags on lines of their own, indented.
INDENTED_TEMPLATE = ("{%- for m in messages %}\n"
                     "    {% if m.role == 'user' %}\n"
                     "        <user>{{ m.content }}</user>\n"
                     "    {% else %}\n"
                     "        <bot>{{ m.content }}</bot>\n"
                     "    {% endif %}\n"
                     "{% endfor %}\n"
                     "{% if add_generation_prompt %}<bot>{% endif %}")


def test_indented_block_tags_leave_no_spaces_or_newlines_as_in_transformers():
    # transformers renders with trim_blocks (no newline after a tag) and lstrip_blocks (no indentation before one).
    _, transformers = require_reference()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    theirs = transformers.utils.chat_template_utils.render_jinja_template(
        [messages], chat_template=INDENTED_TEMPLATE, add_generation_prompt=True)[0][0]
    ours = render_chat({"chat_template": INDENTED_TEMPLATE}, messages, add_generation_prompt=True)
    assert ours == theirs == "        <user>Hi</user>\n        <bot>Hello</bot>\n<bot>"


# --- tokenizer loading against the reference ids ----------------------------------------------

def ggml_cases(directory):  # llama.cpp's .inp/.out pairs: [(text, ids)]
    texts = (directory / "ggml-vocab-qwen2.gguf.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    lines = (directory / "ggml-vocab-qwen2.gguf.out").read_bytes().decode("utf-8").split("\n")
    assert texts[-1] == "" and lines[-1] == ""
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts[:-1], lines[:-1], strict=True)]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_loaded_tokenizer_reproduces_the_reference_ids(shared_data, name, tmp_path):
    tokenizer = load_tokenizer(shared_data / name)
    vectors = shared_data / "tokenizer-vectors"
    cases = ggml_cases(vectors) + [(c["text"], c["ids"]) for c in
                                   json.loads((vectors / "qwen2.5_hf_golden_tokens.json").read_text("utf-8"))]
    assert len(cases) == 43 + 51
    assert any("<|im_start|>" in text for text, _ in cases)
    for text, ids in cases:
        assert tokenizer.encode(text).ids == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert load_tokenizer(tmp_path) is None  # no tokenizer.json: None, not an error
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(qwen_np.QwenNPError, match="could not be read as a tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_vocab_and_merges_without_tokenizer_json_give_the_same_tokenizer(shared_data, name, tmp_path):
    # As transformers builds Qwen2Tokenizer from them: the same ids as tokenizer.json, added tokens included.
    directory = write_vocab_and_merges(shared_data / name, tmp_path)
    tokenizer, reference = load_tokenizer(directory, "qwen3"), load_tokenizer(shared_data / name)
    assert tokenizer.get_vocab() == reference.get_vocab()
    vectors = shared_data / "tokenizer-vectors"
    cases = ggml_cases(vectors) + [(c["text"], c["ids"]) for c in
                                   json.loads((vectors / "qwen2.5_hf_golden_tokens.json").read_text("utf-8"))]
    for text, ids in cases + [(text, reference.encode(text).ids) for text in TRICKY_TEXTS]:
        assert tokenizer.encode(text).ids == ids, text
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert load_tokenizer(directory, "llama") is not None  # tokenizer_config.json says Qwen2Tokenizer
    config = read_json(directory / "tokenizer_config.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert load_tokenizer(directory, "qwen3") is None  # another class: not guessed at
    (directory / "tokenizer_config.json").unlink()
    assert load_tokenizer(directory, "llama") is None and load_tokenizer(directory, "qwen2") is not None
    added = dict(config["added_tokens_decoder"])
    added["151700"] = added.pop(max(added, key=int))  # an id that does not follow the ones before it
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": added}))
    with pytest.raises(qwen_np.QwenNPError, match=r"tokenizer_config.json: added token '.*' has id 151700 in "
                                                  r"added_tokens_decoder, but vocab.json and the tokens before it "
                                                  r"put it at 1516\d\d$"):
        load_tokenizer(directory, "qwen3")
    (directory / "merges.txt").write_text("#version: 0.2\nnot-a-token pair\n")
    with pytest.raises(qwen_np.QwenNPError, match="vocab.json and merges.txt could not be read as a BPE tokenizer"):
        load_tokenizer(directory, "qwen3")


@pytest.mark.parametrize("name", TOKENIZERS)
def test_vocab_and_merges_tokenize_as_transformers_does(shared_data, name, tmp_path, reference):
    from transformers import AutoTokenizer

    directory = write_vocab_and_merges(shared_data / name, tmp_path)
    ours, theirs = load_tokenizer(directory, "qwen3"), AutoTokenizer.from_pretrained(str(directory))
    assert not (directory / "tokenizer.json").exists()  # transformers built it from the two files too
    for text in TRICKY_TEXTS + ["café ﬁ Å  spaces\t\n\n", "<|endoftext|><|fim_prefix|>x<|fim_suffix|>"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    for messages in CHATS.values():
        assert ours.encode(theirs.apply_chat_template(messages, tokenize=False)).ids == theirs.apply_chat_template(
            messages, tokenize=True, return_dict=False)
    # Without added_tokens_decoder (older files), the special tokens are added after vocab.json's, in the
    # same order as transformers adds them.
    config = read_json(directory / "tokenizer_config.json")
    del config["added_tokens_decoder"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(directory, "qwen3"), AutoTokenizer.from_pretrained(str(directory))
    assert ours.get_vocab() == theirs.get_vocab() and len(ours.get_vocab()) > len(json.loads(
        (directory / "vocab.json").read_text("utf-8")))


# --- incremental decoding ----------------------------------------------------------------------

@pytest.mark.parametrize("text, splits", [("我住在 巴黎，喜欢龘靐齉爩。", True),
                                         ("Emoji: 🦙👋🏽🇫🇷 and 👨‍👩‍👧 done", True),
                                         ("你好，世界！naïve café — ok", False),
                                         ("<|im_start|>assistant\n 巴黎<|im_end|> ok", True)])  # kept in the text
def test_incremental_decoding_never_splits_a_character(qwen3_tokenizer, text, splits):
    tokenizer = qwen3_tokenizer
    ids = tokenizer.encode(text).ids
    # Whether some token holds only part of a character (then decoded alone it ends in U+FFFD).
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids) == splits
    pieces, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):  # as if the tokens arrived one at a time
        piece, prefix, read = decode_step(tokenizer, ids[:n], prefix, read)
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(decode_rest(tokenizer, ids, prefix, read))
    assert "".join(pieces) == text
    assert ("" in pieces[:-1]) == splits  # a step that completed no character showed nothing


def test_text_cut_off_mid_character_comes_out_at_the_end(qwen3_tokenizer):
    tokenizer = qwen3_tokenizer
    ids = tokenizer.encode(" 巴").ids[:1]  # the first of the two tokens of " 巴"
    piece, prefix, read = decode_step(tokenizer, ids, 0, 0)
    assert piece == ""  # held back, waiting for the rest of the character
    assert decode_rest(tokenizer, ids, prefix, read) == " \ufffd"  # at the end, shown as it is
    # the same after a special token, which decode_step keeps in the text it compares with
    ids, prefix, read = [], 0, 0
    for token in tokenizer.encode("Hi<|im_end|>").ids + tokenizer.encode(" 巴").ids[:1]:
        ids.append(token)
        piece, prefix, read = decode_step(tokenizer, ids, prefix, read)
    assert piece == "" and decode_rest(tokenizer, ids, prefix, read) == " \ufffd"


MESSAGE_TEMPLATE = ("{% for m in messages %}{{ 'tool_calls' in m }} [{{ m.content }}] {{ m.thinking }}|"
                    "{{ m.reasoning_content }}|{{ m.reasoning }};{% endfor %}")


def test_messages_reach_the_template_as_apply_chat_template_gives_them(shared_data):
    # Keys set to None are dropped (content None renders as nothing, not "None"); a message's reasoning
    # is offered as thinking, reasoning_content and its own key.
    _, transformers = require_reference()
    tokenizer = transformers.AutoTokenizer.from_pretrained(shared_data / "qwen3-tokenizer")
    messages = [{"role": "user", "content": "Hi", "tool_calls": None},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}], "reasoning": "hmm"}]
    theirs = tokenizer.apply_chat_template(messages, chat_template=MESSAGE_TEMPLATE, tokenize=False)
    assert render_chat({"chat_template": MESSAGE_TEMPLATE}, messages) == theirs == \
        "False [Hi] ||;True [] hmm|hmm|hmm;"


# A checkpoint with a chat template (tokenizer_config.json) but no tokenizer.json (older
# repositories ship vocab.json + merges.txt only). Without the check: "the tokenizer of ... failed to
# encode the chat ('NoneType' object has no attribute 'encode'): its tokenizer may be damaged" -- it has none.
def test_a_chat_without_a_tokenizer_says_so(shared_data, tmp_path):
    tiny_model("qwen2", tmp_path)
    shutil.copy(shared_data / "qwen2.5-tokenizer" / "tokenizer_config.json", tmp_path)
    model = qwen_np.load(tmp_path)
    assert model.tokenizer is None and model.tokenizer_config["chat_template"]
    messages = [{"role": "user", "content": "hi"}]
    path = re.escape(str(tmp_path))
    for call in (lambda: qwen_np.chat_ids(model, messages), lambda: next(qwen_np.chat(model, messages))):
        with pytest.raises(qwen_np.QwenNPError, match=rf"^{path} has no tokenizer \(no tokenizer.json\), so it "
                                                      rf"cannot encode a chat$"):
            call()
