"""The worker process's command line: its flags and exit codes, defined once.

A worker is started as `python -m diffserve.worker --scheduler ADDR --model-path DIR ...`, either by
hand or by the scheduler's launcher for `diffserve serve` / `diffserve generate --model-path`. This
module is that contract, beside the worker's wire protocol (worker.proto): the worker parses its
argv with it, `diffserve serve` / `generate` offer the same flags, and `worker_argv` turns parsed
flags back into the worker's argv; env_defaults lets every long flag of these command lines come
from a DIFFSERVE_* environment variable. Imports only argparse (the scheduler never imports torch).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

EXIT_OK = 0
EXIT_CANNOT_LOAD = 2  # the model cannot be loaded or the layout is impossible: the launcher does not restart it

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, sig: int) -> bool:
    """Asks the kernel to send `sig` to this process when its parent dies (Linux prctl
    PR_SET_PDEATHSIG), for processes that must not outlive the one that started them, even when it
    is SIGKILLed. Returns False where unsupported (then poll os.getppid()). A parent already gone
    (not `parent_pid` any more) gets the signal sent at once. Used by `serve` under `generate` and
    by local workers; the parent must start the child from its main thread (the signal follows
    the thread that forked)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # it died before prctl
        os.kill(os.getpid(), sig)
    return True


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 1000**2, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1000**3, "GIB": 1 << 30, "T": 1 << 40, "TB": 1000**4, "TIB": 1 << 40}


def byte_size(text: str) -> int:
    """'4GiB', '512M', '1000000' -> bytes (K/M/G/T and KiB.. are powers of 1024, KB.. of 1000)."""
    number = text.strip().rstrip("bBiIkKmMgGtT").strip()
    unit = text.strip()[len(number):].strip().upper() if number else ""
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 4GiB or a number of bytes)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes (got {text!r})")
    return int(value)


@dataclass(frozen=True)
class Flag:
    name: str  # as the worker spells it
    kwargs: dict[str, Any] = field(default_factory=dict)  # argparse.add_argument keywords
    outer: str = ""  # spelling on `diffserve serve` / `generate` where it differs (default: the same)

    @property
    def outer_name(self) -> str:
        return self.outer or self.name

    @property
    def default(self) -> Any:
        if self.kwargs.get("action") == "store_true":
            return False
        return self.kwargs.get("default")


# Flags a worker takes that `diffserve serve` / `generate` also offer (and pass on).
WORKER_FLAGS: tuple[Flag, ...] = (
    Flag("--model-path", dict(help="diffusers-layout folder, or a hub id where the network allows")),
    Flag("--model-name", dict(default="", help="model name clients use (default: the folder's name); with generate --server, the served model to use")),
    Flag("--device", dict(default="auto", help="auto, cpu, cuda, cuda:N")),
    Flag("--dtype", dict(default="auto", help="auto (bf16 on GPU, float32 on CPU), bfloat16, float16, float32")),
    Flag("--attention-backend", dict(default="auto", help="auto (fastest exact one available), fa3, flash-attn, cudnn, sdpa; "
                                                          "fa3-fp8: FA3 on FP8 q/k/v, an approximation (docs/acceleration.md)")),
    Flag("--quantization", dict(default="none", choices=("none", "fp8"),
                                help="none (default): the checkpoint's precision; fp8: the transformer blocks' linears in FP8 (weights per "
                                     "output channel, activations per token), an approximation (docs/acceleration.md)")),
    Flag("--compile", dict(action="store_true", help="torch.compile the DiT (GPU; see bench/NOTES.md)")),
    Flag("--cuda-graphs", dict(nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                               help="replay the DiT forward from CUDA graphs, one per shape and batch (GPU): auto (default) where "
                                    "they pay, for forwards of at most --cuda-graph-max-tokens per GPU; on (also bare --cuda-graphs): "
                                    "every forward; off: never (docs/cli.md)")),
    Flag("--cuda-graph-max-tokens", dict(type=int, default=4096, metavar="N",
                                         help="with --cuda-graphs auto: capture forwards of at most N latent tokens (all rows) per GPU "
                                              "of the group; larger ones are GPU-bound and gain nothing (bench/NOTES.md; default 4096)")),
    Flag("--concurrent-stages", dict(action="store_true",
                                     help="run encode / prepare / decode beside the denoising steps, on a thread and CUDA stream of "
                                          "their own (one-GPU workers; default: between steps; docs/architecture.md)")),
    Flag("--warmup", dict(action="store_true", help="warm up before serving (the first request is not the slow one)")),
    Flag("--warmup-shape", dict(action="append", default=[], metavar="HxWxF", help="shape bucket to warm up (repeatable; default: the model's default size)")),
    Flag("--num-gpus", dict(type=int, default=1, help="processes (GPUs) in the worker group (default 1)")),
    Flag("--enable-cfg-parallel", dict(action="store_true", help="conditional and unconditional rows on separate halves of the group")),
    Flag("--ulysses-degree", dict(type=int, default=0, help="Ulysses sequence-parallel degree (default: chosen from --num-gpus)")),
    Flag("--ring-degree", dict(type=int, default=0, help="Ring sequence-parallel degree (default: chosen from --num-gpus)")),
    Flag("--tp-size", dict(type=int, default=0, help="tensor-parallel degree (default 1)")),
    Flag("--lora-dir", dict(default="", metavar="DIR",
                            help="serve the LoRA adapters in DIR per request: each NAME.safetensors there is adapter NAME "
                                 "(diffusers / PEFT format; docs/acceleration.md). Default: no LoRA")),
    Flag("--lora-cache-bytes", dict(type=byte_size, default=4 << 30, metavar="SIZE",
                                    help="most memory the LoRA adapters kept loaded may take, e.g. 512MiB or 8GiB; the least "
                                         "recently used go first (default 4GiB)")),
    Flag("--max-batch-size", dict(type=int, default=4, help="most jobs sharing one denoising step (default 4)")),
    Flag("--max-resident", dict(type=int, default=8, help="most jobs a worker holds at once (default 8)")),
    Flag("--log-level", dict(default="INFO", help="log level of the worker process"), outer="--worker-log-level"),
)


Z85_KEY_RE = re.compile(r"[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}")  # a CURVE key's 40-character z85 text


def shield_dash_keys(argv: list[str], value_flags: tuple[str, ...] = ("--scheduler-key",)) -> list[str]:
    """`argv` with every z85 key that starts with '-' made safe for argparse, which would read it as
    an unknown option (z85 has '-' among its 85 characters: about one key in 85 starts with it).
    After one of `value_flags` the key joins the flag (`--scheduler-key=-Kx...`); elsewhere (a
    positional key, `keys add NAME KEY`) a '--' goes before it, so it must be the last argument."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("-") and Z85_KEY_RE.fullmatch(arg) and "--" not in argv[:i]:
            if out and out[-1] in value_flags:
                out[-1] = f"{out[-1]}={arg}"
                continue
            if i == len(argv) - 1:
                out.append("--")
        out.append(arg)
    return out


def add_worker_auth_flags(parser: argparse.ArgumentParser) -> None:
    """The worker's side of the worker-protocol authentication (CURVE keys; docs/cli.md). The scheduler
    passes its local workers the key files of its state folder; a remote worker is given them by hand.
    Only paths and public keys here: no secret ever goes on a command line."""
    parser.add_argument("--key-file", default="", help="this worker's CURVE keypair (NAME.key_secret from `diffserve keys new NAME`)")
    parser.add_argument("--scheduler-key", default="", help="the scheduler's public key: its 40-character text (`diffserve keys scheduler`) or its key file")
    parser.add_argument("--insecure-worker-plaintext", action="store_true",
                        help="connect without CURVE (only to a scheduler started with the same flag, on loopback)")


def _dest(name: str) -> str:
    return name.removeprefix("--").replace("-", "_")


def add_worker_flags(parser: argparse.ArgumentParser, *, outer: bool = False, model_path_required: bool = False) -> None:
    """Adds WORKER_FLAGS to `parser`: as the worker spells them, or (outer=True) as `diffserve serve`
    and `generate` do. Parsed values land under the worker's names (args.model_path, args.log_level,
    or for the outer spelling args.worker_log_level)."""
    for flag in WORKER_FLAGS:
        kwargs = dict(flag.kwargs)
        if flag.name == "--model-path" and model_path_required:
            kwargs["required"] = True
        if kwargs.get("action") == "append":
            kwargs["default"] = list(kwargs["default"])  # argparse appends to the default list
        parser.add_argument(flag.outer_name if outer else flag.name, **kwargs)


# ---- flags from DIFFSERVE_* environment variables ----

ENV_PREFIX = "DIFFSERVE_"
# Set by diffserve for the diffserve processes it starts (generate's private server, serve's local
# workers): they are configured by their command line alone, not by variables meant for the parent.
NO_ENV = "DIFFSERVE_NO_ENV"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
ENV_EPILOG = (f"Every --flag-name can also be set in the environment as {ENV_PREFIX}FLAG_NAME (the command line wins; "
              "on/off flags take 1/0, true/false, yes/no; repeatable flags a comma-separated list).")


def env_name(option: str) -> str:
    """The variable of a long flag: --max-queue -> DIFFSERVE_MAX_QUEUE."""
    return ENV_PREFIX + option.removeprefix("--").replace("-", "_").upper()


class _EnvAppend(argparse._AppendAction):
    """A repeatable flag whose default came from the environment: its first use on the command line
    replaces that list instead of adding to it (the command line wins)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def _convert(action: argparse.Action, text: str) -> Any:
    convert = action.type or str
    try:
        value = convert(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    except (TypeError, ValueError):
        raise ValueError(f"not a valid {getattr(convert, '__name__', 'value').removesuffix('_type')}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return value


def _env_value(action: argparse.Action, text: str) -> Any:
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError("expected 1/0, true/false, yes/no or on/off")
        return action.const if word in _TRUE else action.default
    if isinstance(action, argparse._AppendAction) or action.nargs not in (None, "?"):
        return [_convert(action, item.strip()) for item in text.split(",") if item.strip()]
    return _convert(action, text)


def env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> list[str]:
    """Takes the default of every long flag of `parser` (and of its subcommands) from its
    DIFFSERVE_* variable where one is set: --foo-bar from DIFFSERVE_FOO_BAR. The command line still
    wins; a variable makes a required flag optional. A value that does not convert ends the program
    with one line naming the variable (exit 2). Hidden flags (help=SUPPRESS) are left alone, and so
    is everything when DIFFSERVE_NO_ENV is set. Returns the variables used. Call it once all flags
    are added (and after set_defaults)."""
    environ = os.environ if environ is None else environ
    if environ.get(NO_ENV):
        return []
    used: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                used += env_defaults(sub, environ)
            continue
        options = [o for o in action.option_strings if o.startswith("--")]
        if not options or action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = env_name(options[0])
        if name not in environ:
            continue
        try:
            value = _env_value(action, environ[name])
        except ValueError as exc:
            parser.exit(2, f"{parser.prog}: error: {name}={environ[name]!r} (for {options[0]}): {exc}\n")
        action.default, action.required = value, False
        if action.dest in parser._defaults:  # set_defaults() would win over action.default
            parser._defaults[action.dest] = value
        if isinstance(action, argparse._AppendAction):
            action.__class__ = _EnvAppend
        used.append(name)
    if parser.epilog is None:
        parser.epilog = ENV_EPILOG
    return used


def worker_argv(args: argparse.Namespace, *, outer: bool = False) -> list[str]:
    """The argv that passes the worker flags parsed into `args` on (flags left at their default are
    left out): to a worker (outer=False) or to another `diffserve serve` (outer=True). `args` was
    parsed with add_worker_flags(outer=True)."""
    out: list[str] = []
    for flag in WORKER_FLAGS:
        value = getattr(args, _dest(flag.outer_name))
        if value is None or value == flag.default:
            continue
        name = flag.outer_name if outer else flag.name
        action = flag.kwargs.get("action")
        if action == "store_true":
            out.append(name)
        elif action == "append":
            for item in value:
                out += [name, str(item)]
        else:
            out += [name, str(value)]
    return out
