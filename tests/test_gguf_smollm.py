"""The real SmolLM2-135M-Instruct GGUF from ../shared/data (architecture llama, Q4_1 weights, a Q8_0
embedding): the out-of-the-box model. Logits and tokens against transformers reading the same
file, and a greedy chat through the file's own chat template."""

import jinja2.sandbox
import numpy as np
import pytest
from conftest import VARIED_TEXT, require_module

import qwen_np


@pytest.fixture(scope="module")
def smollm_path(shared_data):
    return shared_data / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm(smollm_path):
    return qwen_np.load(smollm_path)


def test_smollm_config_and_chat_settings(smollm):
    c = smollm.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (
        "llama", 30, 576, 1536, 49152)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias) == (9, 3, 64, False)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert c.rms_norm_eps == pytest.approx(1e-5)
    embeddings = smollm.params["model"]["embed_tokens"]["weight"]
    assert c.tie_word_embeddings and smollm.params["lm_head"]["weight"] is embeddings
    assert smollm.params["model"]["embed_tokens"]["weight"].dtype == np.float32
    assert {k: v for k, v in smollm.tokenizer_config.items() if k != "chat_template"} == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    assert smollm.tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    # <|im_end|> (the file's eos), <|endoftext|> and <reponame>: where llama.cpp stops generating
    assert smollm.generation_config == {"bos_token_id": 1, "eos_token_id": [2, 0, 4], "pad_token_id": 2}


@pytest.fixture
def gguf_reference(reference):  # torch and transformers, which reads GGUF files with the gguf package
    require_module("gguf")
    return reference


def test_smollm_logits_match_transformers(smollm, smollm_path, gguf_reference):
    torch, transformers = gguf_reference
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32, attn_implementation="eager")
    ids = np.array([smollm.tokenizer.encode("The capital of France is").ids])
    ours, _ = qwen_np.forward(smollm.params, smollm.config, ids)
    with torch.no_grad():
        theirs = theirs_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)  # measured: at most 1e-4 on logits up to 27
    assert ours[0, -1].argmax() == theirs[0, -1].argmax() == smollm.tokenizer.token_to_id("ĠParis")


def test_smollm_tokenizer_matches_transformers(smollm, smollm_path, gguf_reference):
    _, transformers = gguf_reference
    theirs = transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)
    for text in VARIED_TEXT.split("\n") + [VARIED_TEXT, " 2024 and 3.14159"]:
        ids = smollm.tokenizer.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert smollm.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert smollm.tokenizer.encode("<|im_start|>user").ids[0] == 1  # a control token, matched whole


@pytest.mark.parametrize("text, ids", [("x\n\n1", [104, 1116, 33]), ("x  12", [104, 256, 33, 34])])
def test_smollm_splits_digits_off_first_as_llama_cpp_does(smollm, text, ids):
    # The file says tokenizer.ggml.pre = "smollm": llama.cpp splits each digit off first, then applies
    # GPT-2's split to the rest, so "\n\n" before a digit stays one token (1116) and so do two spaces
    # (256). transformers' GGUF tokenizer has no "smollm" entry and splits them ([104, 198, 198, 33]).
    assert smollm.tokenizer.encode(text).ids == ids


def render_chat(model, messages):
    """The prompt of a chat, by the checkpoint's own template (rendered as transformers does)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(model.tokenizer_config["chat_template"]).render(
        messages=messages, add_generation_prompt=True, **model.tokenizer_config)


def greedy(model, prompt, max_new_tokens):  # -> the generated text, up to the end of the turn
    logits, cache = qwen_np.forward(model.params, model.config, np.array([model.tokenizer.encode(prompt).ids]),
                                    last_only=True)
    generated = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in model.generation_config["eos_token_id"]:
            break
        generated.append(token)
        logits, cache = qwen_np.forward(model.params, model.config, np.array([[token]]), cache=cache)
    return model.tokenizer.decode(generated)


def test_smollm_greedy_chat_answers_paris(smollm):
    prompt = render_chat(smollm, [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert greedy(smollm, prompt, max_new_tokens=12).startswith("The capital of France is Paris.")
