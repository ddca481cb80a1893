"""The command line: stream a completion, or chat in the terminal.

    python -m qwen_np generate --model PATH "The capital of France is"
    python -m qwen_np chat --model PATH --system "Be brief." --no-think

Both print prefill and decode speed (tokens/s) to stderr at the end. An error is one line on
stderr and a non-zero exit status, never a traceback.
"""

import argparse
import os
import sys

from .config import QwenNPError
from .generate import counted, no_tokenizer


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise QwenNPError(f"{message} (see {self.prog} --help)")


def number(kind, low, high=None, low_open=False, what=""):
    """An argparse type: a `kind` number in [low, high] (low excluded when low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        # Written "not (value >= low)", not "value < low": NaN fails every comparison, so is refused here.
        if not (value > low if low_open else value >= low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value
    return parse


def build_parser():  # -> the argparse parser of `python -m qwen_np` (subcommands generate and chat)
    parser = Parser(prog="python -m qwen_np", description="Generate text or chat with a Qwen checkpoint, in NumPy.",
                    epilog='examples:\n  python -m qwen_np generate --model PATH "The capital of France is"\n'
                           '  python -m qwen_np chat --model PATH --system "Be brief." --no-think\n'
                           '  python -m qwen_np chat --model Qwen/Qwen3-0.6B     (after: hf download Qwen/Qwen3-0.6B)\n'
                           'python -m qwen_np COMMAND --help lists the flags of a command.\n'
                           'python -m qwen_np.bench times qwen_np against transformers (see its --help).',
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat}")

    def common(sub):
        sub.add_argument("--model", metavar="PATH",
                         help="checkpoint directory (config.json, *.safetensors, tokenizer.json), .gguf "
                              "file, or Hub id (Qwen/Qwen3-0.6B) already in the Hugging Face cache; default: "
                              "the project's default small model")
        sub.add_argument("--low-memory", action="store_true",
                         help="keep the weight matrices in bfloat16: half the memory, slower decoding")
        sampling = sub.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else "
                                          "transformers': greedy, and top-k 50 once sampling)")
        add = sampling.add_argument
        add("--temperature", metavar="T", type=number(float, 0, what="use 0 (greedy) or a positive number"),
            help="divide the logits by T; 0 = greedy (always the most probable token)")
        add("--top-k", metavar="K", type=number(int, 0, what="use 0 (off) or a positive integer"),
            help="sample only among the K most probable tokens (0 = off)")
        add("--top-p", metavar="P", type=number(float, 0, 1, low_open=True, what="use a number in (0, 1]"),
            help="sample only among the most probable tokens whose probabilities add up to P (1 = off)")
        add("--min-p", metavar="P", type=number(float, 0, 1, what="use a number in [0, 1]"),
            help="drop the tokens less than P times as probable as the most probable one (0 = off)")
        add("--repetition-penalty", metavar="R", type=number(float, 0, low_open=True, what="use a positive number"),
            help="make the tokens already in the text less likely (R > 1) or more likely (R < 1); 1 = off")
        add("--seed", metavar="N", type=number(int, 0, what="use an integer >= 0"),
            help="random seed, so that a sampled run repeats exactly")
        add("--max-new-tokens", metavar="N", type=number(int, 1, what="use a positive integer"),
            help="stop after N new tokens (default: as many as fit in the context, at most "
                 "generation_config.json's max_new_tokens, else 512)")
        add("--stop", action="append", metavar="TEXT",
            help="stop when the output contains TEXT (TEXT is not printed); may be repeated")

    gen = commands.add_parser("generate", help="stream the completion of a prompt",
                              description="Stream the model's continuation of PROMPT to stdout.")
    gen.add_argument("prompt", help='the text to continue; "-" reads it from stdin')
    common(gen)

    chat = commands.add_parser("chat", help="multi-turn chat in the terminal, using the chat template",
                               description="Chat with an instruct model: one message per line on stdin, "
                                           "until end of input or /exit (/clear starts a new conversation). In a "
                                           "terminal, Ctrl-C stops an answer and the chat goes on.")
    chat.add_argument("--system", metavar="TEXT", help="a system message to start the chat with")
    chat.add_argument("--no-think", action="store_true",
                      help="Qwen3: answer without thinking first (sets the template's enable_thinking=False)")
    common(chat)
    return parser


def model_path(args):
    if args.model is not None:
        return args.model
    from .download import default_model_path  # fetched once, see download.py
    return default_model_path()


def sampling_kwargs(args):
    stop = args.stop and [read_utf8(lambda: text, "--stop") for text in args.stop]
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=stop)


def read_utf8(read, where):  # read() -> its text, refused unless it is valid UTF-8
    try:
        text = read()
        text.encode("utf-8")  # where Python escapes undecodable bytes, they come as lone surrogates
    except UnicodeError:
        raise QwenNPError(f"{where} is not valid UTF-8 text") from None
    return text


def stream(pieces, out, interruptible=False):  # prints text pieces as they come; -> (the whole text, GenerationStats)
    # interruptible: Ctrl-C stops the text there and returns (the text so far, None), instead of raising.
    text = []
    while True:
        try:
            piece = next(pieces)
            text.append(piece)
            out.write(piece)
            out.flush()
        except StopIteration as done:
            return "".join(text), done.value
        except Exception:
            if text:  # end the line the text is on, so that the error shows on a line of its own
                out.write("\n")
            raise
        except KeyboardInterrupt:
            if not interruptible:
                raise
            pieces.close()
            return "".join(text), None


def report(stats, err):  # stats: a list of GenerationStats
    def rate(tokens, seconds):
        return f"{tokens / seconds:.1f} tokens/s" if seconds > 0 else "n/a"
    prefill_tokens, prefill_seconds = sum(s.prefill_tokens for s in stats), sum(s.prefill_seconds for s in stats)
    decode_tokens, decode_seconds = sum(s.decode_tokens for s in stats), sum(s.decode_seconds for s in stats)
    reused = sum(s.reused_tokens for s in stats)  # prompt tokens a chat took from its cache instead
    cached = f" (and {reused} from the cache)" if reused else ""
    err.write(f"prefill: {counted(prefill_tokens, 'token')}{cached}, {rate(prefill_tokens, prefill_seconds)}; "
              f"decode: {counted(decode_tokens, 'token')}, {rate(decode_tokens, decode_seconds)}\n")


def run_generate(model, args):  # `generate`: streams the completion of one prompt to stdout
    from .generate import generate_text
    if args.prompt == "-":
        prompt = read_utf8(sys.stdin.read, "the prompt on stdin")
    else:
        prompt = read_utf8(lambda: args.prompt, "the prompt")
    _, stats = stream(generate_text(model, prompt, **sampling_kwargs(args)), sys.stdout)
    sys.stdout.write("\n")
    report([stats], sys.stderr)


def run_chat(model, args):  # `chat`: one message a line from stdin, each turn reusing the last one's KV cache
    from .chat import chat, split_thinking
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
        sys.stderr.write("Type a message and press Enter; Ctrl-C stops an answer; /clear starts over; "
                         "/exit or Ctrl-D to leave.\n")
    # What every conversation begins with (an empty --system too: it replaces the template's default one).
    start = [] if args.system is None else [{"role": "system", "content": read_utf8(lambda: args.system, "--system")}]
    messages = list(start)
    variables = {"enable_thinking": False} if args.no_think else {}
    stats, past = [], None  # past: the conversation's KV cache, so each turn prefills only its new tokens
    while True:
        try:
            line = read_utf8(lambda: input("> " if interactive else ""), "the message on stdin")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/clear":  # a new conversation: only the system message stays
            messages, past = list(start), None
            if interactive:
                sys.stderr.write("(new conversation)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        # In a terminal, Ctrl-C stops the answer and the chat goes on (when piped, it ends the program).
        try:
            reply, turn = stream(chat(model, messages, past=past, **variables, **sampling_kwargs(args)), sys.stdout,
                                 interruptible=interactive)
        except QwenNPError as e:  # say, the conversation outgrew the context: in a terminal, the chat goes on
            if not interactive:
                raise
            sys.stderr.write(one_line_error(e) + "(message dropped; /clear starts a new conversation, /exit leaves)\n")
            messages.pop()
            continue
        sys.stdout.write("\n")
        if turn is None:  # stopped: the history keeps what was shown; the last turn's cache stays usable
            sys.stderr.write("(answer stopped)\n")
        else:
            stats.append(turn)
            past = turn.past
        # The history keeps the answer only; Qwen3's template drops old thinking anyway.
        messages.append({"role": "assistant", "content": split_thinking(reply)[1]})
    if stats:
        report(stats, sys.stderr)


def one_line_error(e):  # -> "error: ...\n", on one line even where the message quotes a newline (in a path, say)
    return "error: " + str(e).replace("\r", "\\r").replace("\n", "\\n") + "\n"


def main(argv=None):
    # The model writes any Unicode: where the terminal's or pipe's encoding lacks a character (a
    # cp1252 console, PYTHONIOENCODING=ascii), it is shown as "?" rather than ending the answer.
    for std in (sys.stdout, sys.stderr):
        if hasattr(std, "reconfigure"):
            std.reconfigure(errors="replace")
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python leaves None there
        sys.stderr.write("error: standard output is closed: there is nowhere to write the text\n")
        return 1
    if sys.stdin is None:  # started with stdin closed (`<&-`): read it as an empty input
        sys.stdin = open(os.devnull, encoding="utf-8")
    try:
        args = build_parser().parse_args(argv)
        from . import load
        model = load(model_path(args), low_memory=args.low_memory)
        if model.tokenizer is None:
            raise QwenNPError(f"{no_tokenizer(model)}; the command line needs one to read and write text")
        (run_generate if args.command == "generate" else run_chat)(model, args)
    except QwenNPError as e:
        sys.stderr.write(one_line_error(e))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`)
        return 141
    except OSError as e:  # unreadable files and the like
        sys.stderr.write(one_line_error(e))
        return 1
    except MemoryError as e:
        sys.stderr.write(f"error: out of memory ({e or 'no details'}): try a smaller model, --low-memory or a "
                         f"smaller --max-new-tokens\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
