"""The `hetis` command.

  hetis up         a local cluster: private Redis + attention workers + dense worker + router
  hetis generate   complete a prompt on a running cluster (streamed)
  hetis chat       an interactive chat on a running cluster
  hetis status     the cluster's workers, placement and load
  hetis demo       a local mesh, shown working: SDK streams, status, the OpenAI API
  hetis bench      a serving benchmark (TTFT, TPOT, ITL, throughput) of a cluster or the engine
  hetis allocate   divide a heterogeneous GPU pool among tenants (OEF)
  hetis simulate   a deployment on GPUs we do not have: our scheduler on a virtual clock
  hetis plan       the paper's deployment search for a mixed cluster (CLUSTER.yaml)

Exit status: 0 success, 1 an error from the server or a service, 2 bad command-line input.
Client commands talk to --target (default: $HETIS_TARGET, else localhost:50051).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from hetis import defaults
from hetis.bench import cli as bench_cli
from hetis.bench.cli import UsageError
from hetis.defaults import DEFAULT_TARGET  # noqa: F401 - part of this module's API
from hetis.mesh.flags import add_redispatch_flags, api_key_arg, nonneg_int, port_number, positive_int
from hetis.security import api_key_from_env

CLI_MAX_TOKENS = 128  # a CLI reply of SamplingParams' 16 tokens is too short to read


# ------------------------------------------------------------------ parser
def _client_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=defaults.default_target(),
                   help="router host:port (default: $HETIS_TARGET, else %(default)s)"
                   if not os.environ.get("HETIS_TARGET") else "router host:port (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline per call (default: 30 s for status, 600 s for a generation)")
    g.add_argument("--api-key", type=api_key_arg, default=None, metavar="KEY",
                   help="the router's API key (default: $HETIS_API_KEY)")
    g.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="connect with TLS, trusting this CA (default: $HETIS_TLS_CA; unset: "
                   "plaintext)")
    return p


def _sampling_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling (defaults: hetis.SamplingParams', except --max-tokens)")
    g.add_argument("--max-tokens", type=int, default=CLI_MAX_TOKENS, metavar="N",
                   help="tokens to generate at most (default %(default)s)")
    g.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (default 1.0)")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling (default 1.0: off)")
    g.add_argument("--top-k", type=int, metavar="K", help="top-k sampling (default -1: off)")
    g.add_argument("--seed", type=int, help="make sampling reproducible")
    g.add_argument("--stop", nargs="+", action="extend", metavar="S",
                   help="stop string(s), not included in the output; repeatable")
    g.add_argument("--stop-token-ids", nargs="+", type=int, action="extend", metavar="ID",
                   help="stop token id(s)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hetis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from hetis import __version__
    ap.add_argument("--version", action="version", version=f"hetis {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    client, sampling = _client_flags(), _sampling_flags()

    up = sub.add_parser("up", help="start a local cluster (Ctrl-C stops it)",
                        description="Start a private Redis (unless --redis-url), N attention "
                        "workers, dense workers and the router as child processes; wait until "
                        "all are healthy; stop them all on Ctrl-C or SIGTERM.")
    up.add_argument("--attn-workers", type=nonneg_int, default=2, metavar="N",
                    help="attention workers (default %(default)s)")
    up.add_argument("--dense-workers", type=positive_int, default=1, metavar="N",
                    help="dense workers: serving instances, each with its own batch, sharing the "
                    "attention workers (default %(default)s)")
    up.add_argument("--tp", type=positive_int, default=1, metavar="K",
                    help="tensor-parallel ranks per dense worker: K processes each, the weights "
                    "and head groups split among them (default %(default)s)")
    up.add_argument("--port", type=port_number, default=defaults.ROUTER_PORT,
                    help="router port (default %(default)s)")
    up.add_argument("--redis-url", default=None, metavar="URL",
                    help="use this Redis instead of starting a private one")
    up.add_argument("--dtype", choices=defaults.DTYPE_NAMES, default=defaults.DEFAULT_DTYPE)
    up.add_argument("--model", default=None, metavar="M",
                    help=".gguf file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    up.add_argument("--policy", choices=defaults.POLICIES, default=defaults.DEFAULT_POLICY,
                    help="head dispatch policy (default %(default)s)")
    up.add_argument("--weights", choices=("dense", "gguf"), default="dense",
                    help="dense workers: 'gguf' keeps the GGUF's Q4 projections int4 (CPU; "
                    "default %(default)s)")
    # one thread each by default: a local cluster shares this machine's cores among its workers
    up.add_argument("--threads", type=positive_int, default=defaults.default_threads(fallback=1),
                    metavar="T", help="torch threads per worker (default: $HETIS_THREADS, else 1)")
    up.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                    help="interface the router binds (default %(default)s; 0.0.0.0: every "
                    "interface); the other services bind 127.0.0.1")
    up.add_argument("--dense-kv-tokens", type=positive_int, default=None, metavar="N",
                    help="KV capacity of the dense worker's own device, tokens x head groups "
                    "(default: the service's, 131072)")
    up.add_argument("--attn-kv-tokens", type=positive_int, default=None, metavar="N",
                    help="KV capacity of each attention worker (default: the service's, 131072)")
    up.add_argument("--kv-cache-dtype", choices=defaults.KV_CACHE_DTYPES, default="auto",
                    help="every worker's KV cache: auto (the model's dtype) or int8 (int8 rows "
                    "with a float32 scale each; default %(default)s)")
    add_redispatch_flags(up)
    up.add_argument("--http-port", type=port_number, default=None, metavar="P",
                    help="the router also serves the OpenAI-compatible HTTP API on this port "
                    "(default: off; docs/http.md)")
    up.add_argument("--api-key", type=api_key_arg, default=api_key_from_env(), metavar="KEY",
                    help="require this key on the router's gRPC and HTTP APIs (default: "
                    "$HETIS_API_KEY; unset: open)")
    up.add_argument("--tls", action="store_true",
                    help="make a private CA and certificates (LOG_DIR/tls) and run every gRPC "
                    "service with TLS; clients need HETIS_TLS_CA (printed)")
    up.add_argument("--restart-workers", action="store_true",
                    help="restart a worker (attention or dense) that exits; it rejoins the mesh")
    up.add_argument("--log-dir", default=None, metavar="DIR",
                    help="where NAME.log of each service goes (default: a new temp dir)")
    up.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="give up if not ready by then (default %(default)s)")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", parents=[client, sampling], help="complete a prompt",
                         description="Complete PROMPT on the cluster, streaming the text to stdout "
                         "(a summary line goes to stderr). PROMPT '-' reads stdin.")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--no-stream", action="store_true", help="print the text when complete")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", parents=[client, sampling], help="interactive chat",
                          description="Chat with the model: one message per line on stdin; the "
                          "conversation is kept. /exit or end-of-file quits, /reset forgets it.")
    chat.add_argument("--system", metavar="S", help="a system message to start with")
    chat.set_defaults(func=cmd_chat)

    st = sub.add_parser("status", parents=[client], help="workers, placement and load",
                        description="The router's view of the cluster.")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="a local mesh, shown working (what `make demo` runs)",
                          description="Start a local cluster (2 attention workers, a memory-poor "
                          "dense worker, the router with its HTTP API), stream completions through "
                          "the SDK, show where the head groups live, ask one question through the "
                          "openai client, and stop everything.")
    demo.add_argument("--model", default=None, metavar="M", help="default: SmolLM2-135M-Instruct")
    demo.add_argument("--dtype", choices=defaults.DTYPE_NAMES, default=defaults.DEFAULT_DTYPE)
    demo.add_argument("--max-tokens", type=positive_int, default=32, metavar="N")
    demo.add_argument("--threads", type=positive_int, default=None, metavar="T",
                      help="torch threads per worker (default 1)")
    demo.set_defaults(func=cmd_demo)

    bench_cli.add_parser(sub)     # sets func=bench_cli.cmd_bench
    from hetis.allocator import cli as allocate_cli
    allocate_cli.add_parser(sub)  # sets func=allocate_cli.run
    from hetis.sim import cli as simulate_cli
    simulate_cli.add_parser(sub)  # sets func=simulate_cli.cmd_simulate
    simulate_cli.add_plan_parser(sub)  # sets func=simulate_cli.cmd_plan
    return ap


def sampling_kwargs(args) -> dict:
    """The sampling flags that were given, checked like SamplingParams (UsageError if bad)."""
    from hetis.engine.sampling import ParamError, SamplingParams
    kw = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.ignore_eos:
        kw["ignore_eos"] = True
    try:
        SamplingParams(**kw)
    except ParamError as e:  # the flag has the field's name
        raise UsageError(f"--{e.param.replace('_', '-')}: {e.reason}") from None
    return kw


def _client(args):
    from hetis.client import Client
    return Client(args.target, timeout=args.timeout, api_key=args.api_key, tls_ca=args.tls_ca)


# ------------------------------------------------------------------ commands
def cmd_up(args) -> int:
    from hetis.up import run_up
    return run_up(args)


def cmd_generate(args) -> int:
    kw = sampling_kwargs(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    t0 = time.perf_counter()
    with _client(args) as c:
        if args.no_stream:
            out = c.generate(prompt, **kw)
            sys.stdout.write(out.text)
        else:
            from hetis.client import Completion
            out = Completion()
            for chunk in c.stream(prompt, **kw):
                out.add(chunk)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    _summary(out, time.perf_counter() - t0)
    return 0


def _summary(out, seconds: float) -> None:
    n = out.completion_tokens or len(out.token_ids)
    print(f"[{out.finish_reason or '?'}: {n} tokens in {seconds:.2f}s, "
          f"{n / max(seconds, 1e-9):.1f} tok/s]", file=sys.stderr)


def cmd_chat(args) -> int:
    from hetis.client import InvalidArgument, ResourceExhausted
    kw = sampling_kwargs(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /reset forgets the conversation, /exit or Ctrl-D quits",
              file=sys.stderr)
    with _client(args) as c:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = list(start)
                continue
            history.append({"role": "user", "content": line})
            reply = []
            try:
                for chunk in c.stream_chat(history, **kw):
                    reply.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            except (InvalidArgument, ResourceExhausted) as e:  # this message failed; go on
                history.pop()
                print(f"error: {_one_line(e)}", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_status(args) -> int:
    with _client(args) as c:
        st = c.cluster_status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print_status(st, args.target)
    return 0


def print_status(st: dict, target: str) -> None:
    """The cluster status as a table (``hetis status``, ``hetis demo``)."""
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"Hetis cluster at {target}  model={st['model'] or '?'}  "
              f"policy={st['policy'] or '?'}", title_justify="left")
    for col, just in [("id", "left"), ("kind", "left"), ("device", "left"), ("address", "left"),
                      ("alive", "center"), ("resident", "right"), ("KV used/total", "right"),
                      ("load (ms/step)", "right"), ("steps / batch", "right")]:
        t.add_column(col, justify=just)
    for w in st["workers"]:
        groups = sum(len(r["groups"]) for r in w["resident"])
        total = w["kv_total_tokens"]
        kv = f"{w['kv_used_tokens']}/{total}" + (
            f" ({100 * w['kv_used_tokens'] / total:.0f}%)" if total else "")
        t.add_row(w["id"], w["kind"], w["device"], w["address"],
                  "[green]yes[/]" if w["alive"] else "[red]NO[/]",
                  f"{len(w['resident'])} req / {groups} grp", kv, f"{w['load'] * 1e3:.2f}",
                  f"{w['steps']} / {w['running']}+{w['waiting']}" if w["kind"] == "dense" else "")
    con = Console()
    if not con.is_terminal:  # piped: do not squeeze the table into 80 columns
        con = Console(width=200)
    con.print(t)
    con.print(f"requests: {st['running']} running, {st['waiting']} waiting; "
              f"head-group moves: {st.get('migrations', 0)} "
              f"({int(st.get('migrated_bytes', 0)) / 2**20:.1f} MiB), "
              f"preemptions: {st.get('preemptions', 0)}")


def cmd_demo(args) -> int:
    from hetis.demo import run_demo
    return run_demo(args)


def _one_line(e) -> str:
    return " ".join(str(e).split())


# ------------------------------------------------------------------ entry point
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hetis.client import HetisError
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"hetis {args.command}: error: {e}", file=sys.stderr)
        return 2
    except HetisError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hetis generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
