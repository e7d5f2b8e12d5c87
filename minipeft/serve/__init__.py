"""`minipeft serve`: one frozen base, any number of named adapters, an OpenAI-compatible API and a page to
compare and tune them.

    browser (page/)  ─┐                      ┌─► engine.py: one thread owns the model; every stream in one mixed
    openai client    ─┼─► http.py ─► api.py ─┤   batch, new ones joining at the next step (continuous batching)
    curl             ─┘   threads    shapes  └─► tuning.py: a training job, one step between decoding steps

    minipeft serve --adapter fox=runs/fox/adapter --adapter code=runs/code/adapter
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "fox", "prompt": "A quick brown fox", "max_tokens": 24, "temperature": 0}'

On 127.0.0.1 (the default) it answers this machine's programs, and refuses pages of other sites. Beyond it
(--host 0.0.0.0) it needs --api-key, and --allow-admin for loading, training and deleting (access.py).
Every request is bounded (limits.py: each bound a flag below).
"""

import argparse
import sys
import threading
from pathlib import Path

from .. import formats
from ..bases import base_for, check_adapters, load_base, parse_adapters
from ..errors import BadInput
from ..llama.loader import DEFAULT_DIR
from .access import KEY_VARIABLE, Access
from .api import Api
from .engine import Engine
from .http import make_server
from .limits import Limits


def add_serve_command(commands):
    serve = commands.add_parser("serve", help="an OpenAI-compatible API and a page over the base and adapters",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--weights", default=str(DEFAULT_DIR), help="HF-layout Llama directory (default: %(default)s)")
    serve.add_argument("--adapter", action="append", help="NAME=PATH of an adapter directory (repeatable); its "
                                                          "NAME is the `model` of requests")
    serve.add_argument("--4bit", dest="four_bit", action=argparse.BooleanOptionalAction,
                       help="load the base in NF4, or in full precision (--no-4bit). Default: as the adapters were "
                            "trained (their files say); NF4 without adapters, as the tune panel trains")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                                                           "machine only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0 picks a free one)")
    serve.add_argument("--max-batch", type=int, default=16, help="streams decoded together (default: %(default)s)")
    serve.add_argument("--max-waiting", type=int, default=64,
                       help="rows queued beyond the batch, 1 or more; more get 503 (default: %(default)s)")
    serve.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    serve.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    serve.add_argument("--api-key", help=f"every request but the page's files needs 'Authorization: Bearer KEY' "
                                         f"(the page asks for it); default: ${KEY_VARIABLE}, else none on loopback")
    serve.add_argument("--allow-admin", action="store_true", help="beyond loopback: let key holders load adapters "
                                                                  "from --adapter-dir, train and delete")
    serve.add_argument("--adapter-dir", help="the directory POST /api/adapters may load from (paths relative to "
                                             "it); without it, no adapter is loaded from a path while serving")
    Limits.add_arguments(serve)


def start(args):
    """Load the base and adapters; make the engine and the HTTP server (not yet running). Returns (server, engine):
    run `server.serve_forever` on a thread of its own, and `engine.run` on the main thread (engine.py says why)."""
    adapters = parse_adapters(args.adapter)
    check_adapters(args.weights, adapters)  # before the long load
    if args.max_batch < 1 or args.max_waiting < 1:
        raise BadInput("--max-batch and --max-waiting must be 1 or more")
    limits = Limits.from_args(args)
    access = Access(args.host, args.api_key, args.allow_admin, args.adapter_dir)
    model, tokenizer = load_base(args.weights, base := base_for(adapters, args.four_bit), args.device)
    model.eval()
    engine = Engine(model, tokenizer, args.max_batch, args.max_waiting, bf16=base["dtype"] == "bfloat16",
                    max_prefill_tokens=limits.max_prefill_tokens)
    for name, path in adapters.items():
        config = formats.load_adapter(model, path, name=name)
        engine.adapters[name] = {"method": config["peft_type"], "source": path.name}  # no absolute path shown
    api = Api(engine, Path(args.weights).name, access, limits, weights=args.weights)
    try:
        server = make_server(api, args.host, args.port, access, limits, quiet=args.quiet)
    except OSError as e:
        raise BadInput(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    return server, engine


def command_serve(args):
    server, engine = start(args)
    host, port = server.server_address[:2]
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    print(f"serving {args.weights} and {len(engine.adapters)} adapters on http://{host}:{port}/ (page) and "
          f"http://{host}:{port}/v1 (OpenAI API); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
