"""The `dashkv` command: demo, generate, calibrate, eval, bench, serve.

Every subcommand validates its arguments before loading a model, and every error a user can cause
(bad budget, wrong encoders, unsupported model, prompt too long, missing files) is printed as one
`dashkv: error: ...` line with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# torch's OpenMP workers spin for libgomp's default 300000 rounds (milliseconds) after every op, holding the
# cores the fused kernel's batch-row threads need: bounded here, before anything imports torch (libgomp
# reads it once, at load). Measured neutral for torch's own decode steps (docs/kernels.md).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

EPILOG = """\
examples:
  dashkv demo                                   # needle in ~4K tokens, unmodified vs DASH-KV
  dashkv generate --prompt-file doc.txt --max-new-tokens 64 --budget 1/16
  dashkv calibrate --model smollm2-135m --text /usr/share/common-licenses --bits 64 --out enc/
  dashkv eval --methods dashkv,dense,streaming --budgets 1/8,1/16 --tasks niah_single_1 --lengths 4096
  dashkv bench kernel --n 4096,16384,65536 --bits 64 --budget 1/16
  dashkv bench decode --model smollm2-135m --context 8192 --batch 1,8 --dtype bfloat16
  dashkv serve --model smollm2-135m --budget 1/16 --port 8000   # OpenAI-compatible API (pip install 'dashkv[serve]')

The budget is the number of cached tokens each decode step reads per KV head, counting sinks,
the recent window and every candidate: a fraction of the context (1/16, 0.0625) or a count (512).
"""


def _add_model_args(p: argparse.ArgumentParser, encoders: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), a local Hugging Face directory, or a .gguf file (default: %(default)s)")
    if encoders:
        p.add_argument("--encoders", default=None,
                       help="directory written by `dashkv calibrate` (default: the shipped encoders of the "
                            "default model)")


def _add_dashkv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default="1/16", help="tokens read per step: fraction (1/16) or count (512)")
    p.add_argument("--bits", type=int, default=None,
                   help="key code length, a multiple of 64 (default: the --encoders' own, else 64)")
    p.add_argument("--sink", type=int, default=4, help="first tokens always attended (default: %(default)s)")
    p.add_argument("--window", type=int, default=64, help="recent tokens always attended (default: %(default)s)")
    p.add_argument("--min-context", type=int, default=None,
                   help="contexts up to this many tokens decode densely, where selection cannot pay off "
                        "(default: measured per K/V dtype and group score: float32 2560 (1536 with "
                        "--group-score sum), bfloat16/float16 5120)")
    p.add_argument("--rerank", type=int, default=None,
                   help="re-rank stage: re-score this many times the exact tier's candidates from int8 keys "
                        "(charged to the budget at their bytes; 0 = off; default: the configuration's)")
    p.add_argument("--head-budget", choices=("fixed", "pooled"), default=None,
                   help="fixed: equal exact tier per head; pooled: a layer's heads share it by estimated "
                        "attention probability, same mean (default: the configuration's)")
    p.add_argument("--temporal", type=float, default=None, metavar="MU",
                   help="cross-layer momentum: rank by z(score) + MU * z(log attention of the previous "
                        "DASH-KV layer in the step); torch reference path (default: off)")
    _add_query_bits(p)


def _add_query_bits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query-bits", type=int, choices=(4, 8), default=None,
                   help="scan with the query projection rounded to 4 or 8 bits per value (AND + popcount over "
                        "bit planes, faster) instead of float32 byte tables (default: the configuration's)")
    p.add_argument("--lowprec-fraction", type=float, default=None, metavar="F",
                   help="share of the candidate budget's bytes spent on an 8-bit tier (int8 K/V rows, charged "
                        "at their bytes: ~3.8x as many rows in float32); default: the configuration's (0)")
    p.add_argument("--group-score", choices=("sum", "probability"), default=None,
                   help="what one candidate set per KV head ranks by: sum of its query heads' scores (one scan), "
                        "or each head's estimated attention probability summed (as oracle top-k; one scan per "
                        "query head; fused on the CPU) (default: the configuration's: probability, or sum where "
                        "--query-bits or pooled budgets after --rerank / with the 8-bit tier need it)")
    p.add_argument("--rerank-bits", type=int, choices=(8, 4), default=None,
                   help="precision of the re-rank stage's key copy: 8 (int8) or 4 (two levels per byte, half "
                        "the bytes, so a larger exact tier) (default: the configuration's, 8; with dashkv eval it applies to the dashkv_rerank rows)")
    p.add_argument("--successors", type=int, default=None, metavar="S",
                   help="successor pooling: a candidate scores the best of itself and its S predecessors, so "
                        "a selected token brings the next S along (copying spans); torch reference path "
                        "(default: the configuration's, 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dashkv", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="DASH-KV: fast long-context decoding by learned asymmetric hashing of the KV cache.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"dashkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="answer a needle-in-a-haystack prompt with and without DASH-KV",
                       description="Loads the model with its encoders, hides a needle in ~4K tokens of real "
                                   "text and answers it with the unmodified model and with DASH-KV, then "
                                   "repeats for a few needle depths. Prints a table and writes a PNG.")
    _add_model_args(p)
    _add_dashkv_args(p)
    p.add_argument("--length", type=int, default=4000, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths for the table (default: %(default)s)")
    p.add_argument("--text", default=None,
                   help="haystack text file or directory (default: Paul Graham essays if installed, else the "
                        "Python standard library's docs)")
    p.add_argument("--out", default="dashkv-demo", help="output directory for the plot (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per answer (default: %(default)s)")

    p = sub.add_parser("generate", help="generate text with DASH-KV from a prompt file",
                       description="Runs model.generate with DASH-KV enabled and prints the text and decode speed.")
    _add_model_args(p)
    _add_dashkv_args(p)
    p.add_argument("--prompt-file", required=True, help="text file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    p.add_argument("--method", default="dashkv", help="selection method (dashkv, dense, streaming, h2o, snapkv, "
                                                      "quest, simhash, oracle)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="torch seed for --sample (default: %(default)s)")

    p = sub.add_parser("calibrate", help="learn the hash encoders of a model from plain text",
                       description="Captures post-RoPE queries and keys of the frozen model over the text and "
                                   "trains each layer's query and key encoders; writes encoders + a held-out report.")
    from .calibrate import add_arguments as add_calibration_arguments

    add_calibration_arguments(p)

    p = sub.add_parser("eval", help="long-context accuracy of DASH-KV and the baselines at equal budget",
                       description="RULER-style tasks generated offline, every method over the same attention "
                                   "path. Resumable; writes JSON lines, CSV/Markdown summaries and plots.")
    _add_model_args(p)
    p.add_argument("--methods", default="dashkv,dense,streaming,h2o,snapkv,quest,simhash,oracle",
                   help="comma-separated methods, each at every --budgets value (default: %(default)s)")
    p.add_argument("--budgets", default="1/8,1/16",
                   help="comma-separated budgets: fractions of the context in (0, 1] (default: %(default)s)")
    p.add_argument("--tasks", default="niah_single_1,niah_single_2,passkey",
                   help="comma-separated tasks: RULER-style (niah_*, vt, cwe, fwe, passkey), LongBench-style "
                        "(lb_*), teacher-forced fidelity_prose/fidelity_code, perplexity; an unknown name lists them all "
                        "(default: %(default)s)")
    p.add_argument("--lengths", default="4096", help="comma-separated prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length (default: %(default)s)")
    p.add_argument("--haystack", default="default",
                   help="default (each task's RULER haystack), noise, essays, jargon, or files:PATH[,PATH]")
    p.add_argument("--out", default="dashkv-eval",
                   help="output directory; a rerun with the same settings resumes it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task generators (default: %(default)s)")
    p.add_argument("--bits", type=int, default=None,
                   help="code bits: of the random-hyperplane methods, and of the shipped encoders chosen when "
                        "--encoders is not given (default: the --encoders' own, else 64)")
    p.add_argument("--also", action="append", default=[], metavar="METHODS@BUDGETS",
                   help="more cells on the same prefills, e.g. dense,dashkv,oracle,snapkv@1/8,1/32 (repeatable)")
    p.add_argument("--prefill-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the shared dense prefill (bf16: CPU autocast; decode stays fp32)")
    p.add_argument("--positions", type=int, default=None,
                   help="teacher-forced positions per fidelity document (default 128)")
    p.add_argument("--continuation", type=int, default=None, help="scored tokens per perplexity window (64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: DASHKV_EVAL_THREADS or 1)")
    _add_query_bits(p)

    p = sub.add_parser("bench", help="benchmarks: kernel (one layer), decode (end to end), serve (HTTP server)")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    k = bsub.add_parser("kernel", help="one layer's decode attention, DASH-KV vs dense, same run")
    k.add_argument("--n", default="4096,16384,65536,262144", help="context lengths")
    k.add_argument("--bits", default="64,128", help="comma-separated code lengths (default: %(default)s)")
    k.add_argument("--budget", default="1/16", help="exact-tier budget, a fraction or a token count (default: %(default)s)")
    k.add_argument("--shapes", default="smollm2,d128",
                   help="comma-separated head shapes: smollm2 (9 query / 3 KV heads, d 64), d128 (default: %(default)s)")
    k.add_argument("--repeats", type=int, default=20, help="timed rounds per row (default: %(default)s)")
    k.add_argument("--threads", type=int, default=2,
                   help="torch and numba threads of the 2-thread rows (default: %(default)s)")
    k.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="K/V dtype (default: %(default)s)")
    k.add_argument("--json", default=None, help="write the rows as JSON here")
    d = bsub.add_parser("decode", help="decode step time: DASH-KV vs StaticCache, DynamicCache and the floor",
                        description="Prefills every row once from the same prompt, then times decode steps "
                                    "round-robin (one step of each row in turn). Ratios are against "
                                    "transformers' StaticCache measured in the same run.")
    _add_model_args(d)
    _add_dashkv_args(d)
    d.add_argument("--context", type=int, default=8192, help="prompt tokens before decoding (default: %(default)s)")
    d.add_argument("--batch", default="1", help="batch sizes, comma-separated, e.g. 1,8 (default: %(default)s)")
    d.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model and KV dtype (default: %(default)s)")
    d.add_argument("--steps", type=int, default=32, help="timed decode steps per row (default: %(default)s)")
    d.add_argument("--warmup", type=int, default=4, help="untimed steps per row first (default: %(default)s)")
    d.add_argument("--profile", action="store_true",
                   help="afterwards, time each part of DASH-KV's decode step inside a real generate")
    d.add_argument("--json", default=None, help="write the rows as JSON here")
    sv = bsub.add_parser("serve", help="N concurrent streaming clients against `dashkv serve`, DASH-KV vs dense",
                         description="Starts the server in this process (or targets --url) and sends N concurrent "
                                     "streamed completions of --context tokens each, alternating DASH-KV and dense "
                                     "per request; prints aggregate tokens/s and time to first token.")
    from .serve.bench import add_arguments as add_bench_serve_arguments

    add_bench_serve_arguments(sv)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, streaming) over DASH-KV",
                       description="Serves POST /v1/chat/completions and /v1/completions (stream or not), "
                                   "GET /v1/models, /health and /metrics. Concurrent requests are decoded "
                                   "together in one batch. A request may choose its budget or dense decoding with "
                                   'the extension field "dashkv": {"budget": "1/16"} or "dashkv": "dense". '
                                   "Needs the serve extra: pip install 'dashkv[serve]'.")
    _add_model_args(p)
    p.add_argument("--budget", default="1/16",
                   help="default budget of requests that do not choose one: fraction (1/16), count (512) or "
                        "'dense' (default: %(default)s)")
    p.add_argument("--bits", type=int, default=None,
                   help="key code length, a multiple of 64 (default: the --encoders' own, else 64)")
    p.add_argument("--sink", type=int, default=4, help="first tokens always attended (default: %(default)s)")
    p.add_argument("--window", type=int, default=64, help="recent tokens always attended (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and KV cache dtype; the fused CPU kernel serves float32 (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; the server has no authentication, keep it on loopback unless "
                        "something in front of it has (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most requests decoded together in one batch (default: %(default)s)")
    p.add_argument("--max-kv-memory", default="4GiB",
                   help="bound on the K/V + key codes of one batch, estimated from the requested lengths; a "
                        "request that alone exceeds it gets HTTP 413 (default: %(default)s)")
    p.add_argument("--max-context", type=int, default=None,
                   help="refuse prompt + max_tokens past this many tokens (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send and /v1/models lists (default: the --model value)")
    p.add_argument("--scheduler", choices=("auto", "continuous", "admission"), default="auto",
                   help="continuous: requests join and leave the running batch at step boundaries; admission: "
                        "a batch is formed when it starts and runs to its end (auto: continuous unless the "
                        "model has sliding-window layers) (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the worker waits for more requests before starting a batch that is not full "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch and numba (fused kernel) threads (default: their choice)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log level of the server and the engine (default: %(default)s)")
    return parser


def _config_from(args: argparse.Namespace, **extra):
    from .config import DashKVConfig

    return DashKVConfig.from_args(args, **extra)


def _encoders_from(args: argparse.Namespace):
    if getattr(args, "encoders", None) is None:
        return None
    from .encoders import HashEncoders

    return HashEncoders.from_pretrained(args.encoders)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .hf import enable
    from .models import check_context_length, load_model

    config = _config_from(args)  # validate before loading anything
    prompt_path = Path(args.prompt_file)
    if not prompt_path.is_file():
        raise ValueError(f"prompt file {prompt_path} does not exist")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    text = prompt_path.read_text(errors="replace")
    encoders = _encoders_from(args)
    model, tok = load_model(args.model)
    if args.chat:
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")
        input_ids = enc["input_ids"]
    else:
        input_ids = tok(text, return_tensors="pt")["input_ids"]
    check_context_length(model, input_ids.shape[1] + args.max_new_tokens)
    handle = None
    if args.method != "dense":
        handle = enable(model, encoders, config, method=args.method, track=True)
    from .bench_decode import TimingStreamer

    torch.manual_seed(args.seed)
    streamer = TimingStreamer()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, pad_token_id=tok.eos_token_id, streamer=streamer)
    t = streamer.times  # prompt, then one entry per new token: decode speed excludes the prefill
    new = out[0, input_ids.shape[1]:]
    print(tok.decode(new, skip_special_tokens=True))
    decode = f", decode {(len(t) - 2) / (t[-1] - t[1]):.1f} tok/s" if len(t) > 2 else ""
    read = (f", sparse layers read {100 * handle.stats.fraction:.1f}% of the context per step"
            if handle is not None and handle.stats is not None and handle.stats.per_step else "")
    print(f"\n[{args.method}] prompt {input_ids.shape[1]} tokens, {len(new)} new tokens; prefill "
          f"{t[1] - t[0]:.2f} s{decode}{read}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import run_args

    return run_args(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.runner import eval_command

    return eval_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "kernel":
        from .bench import bench_kernel, format_table
        from .config import parse_budget

        ns = [int(x) for x in args.n.split(",")]
        bits = [int(x) for x in args.bits.split(",")]
        rows = bench_kernel(ns=ns, bits=bits, budget=parse_budget(args.budget), shapes=tuple(args.shapes.split(",")),
                            repeats=args.repeats, json_path=args.json, dtype=args.dtype,
                            threads=args.threads)
        print(format_table(rows))
        return 0
    if args.bench == "decode":
        from .bench_decode import bench_decode

        return bench_decode(args)
    if args.bench == "serve":
        from .serve.bench import bench_serve

        return bench_serve(args)
    raise ValueError("choose what to benchmark: `dashkv bench kernel`, `dashkv bench decode` or `dashkv bench serve`")


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.cli import serve_command

    return serve_command(args)


COMMANDS = {"demo": cmd_demo, "generate": cmd_generate, "calibrate": cmd_calibrate, "eval": cmd_eval,
            "bench": cmd_bench, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .encoders import EncoderFileError, EncoderMismatchError
    from .errors import DashKVError

    try:
        return COMMANDS[args.command](args)
    except (DashKVError, EncoderFileError, EncoderMismatchError, ValueError, FileExistsError,
            FileNotFoundError) as e:
        if os.environ.get("DASHKV_DEBUG"):
            raise
        print(f"dashkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dashkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
