"""Atelier's quantization commands (``python -m modules.quantize COMMAND --help`` for each).

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int`` (0 on success, 2 for bad
input with the message on stderr and no traceback); adding one is a line in :data:`COMMANDS`."""
from __future__ import annotations

import argparse
import importlib
import logging

#: command name -> module implementing it
COMMANDS: dict[str, str] = {
    "export": "modules.quantize.export_command",
    "report": "modules.quantize.report_command",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.quantize", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        doc = (module.__doc__ or "").strip()
        command = sub.add_parser(name, help=doc.split("\n")[0], description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(modules[args.command].run(args) or 0)
