"""Flags this extension adds to launch.py (shown in --help)."""


def preload(parser):
    parser.add_argument("--example-greeting", default="Hello", help="example extension: greeting shown on its tab")
