import argparse
import subprocess
import sys

import pytest

from modules.cli import auth_list, build_parser, parse_args

EVERY_FLAG = [
    "--listen", "--server-name", "0.0.0.0", "--port", "7861", "--share", "--gradio-auth", "a:b,c:d",
    "--gradio-auth-path", "auth.txt", "--api", "--api-auth", "u:p", "--nowebui", "--data-dir", "/tmp/x",
    "--models-dir", "/tmp/m", "--ckpt-dir", "/tmp/c", "--lora-dir", "/tmp/l", "--llm-dir", "/tmp/llm",
    "--vae-dir", "/tmp/v", "--embeddings-dir", "/tmp/e", "--device", "cpu", "--precision", "bf16", "--lowvram",
    "--medvram", "--xformers", "--no-half", "--no-half-vae", "--skip-install", "--disable-all-extensions", "--enable-insecure-extension-access",
    "--allow-unsafe-pickle", "--autolaunch", "--diagnose",
]


def test_every_flag_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "auth.txt").write_text("a:b\n")
    opts = parse_args(EVERY_FLAG)
    assert opts.listen and opts.share and opts.api and opts.nowebui and opts.lowvram and opts.medvram
    assert opts.server_name == "0.0.0.0" and opts.port == 7861
    assert opts.gradio_auth == "a:b,c:d" and opts.api_auth == "u:p"
    assert opts.device == "cpu" and opts.precision == "bf16"
    assert (opts.data_dir, opts.ckpt_dir, opts.lora_dir, opts.llm_dir) == ("/tmp/x", "/tmp/c", "/tmp/l", "/tmp/llm")
    assert opts.allow_unsafe_pickle and opts.enable_insecure_extension_access and opts.diagnose
    assert opts.no_half and opts.no_half_vae  # A1111's flags; the NaN-output message recommends --no-half-vae


def test_defaults():
    opts = parse_args([])
    assert opts.port == 7860 and not opts.api and opts.device == "auto" and opts.precision == "auto"


def test_nowebui_implies_api():
    assert parse_args(["--nowebui"]).api


def test_unknown_flag_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["user", "user:", ":pass", "a:b,broken", ""])
def test_malformed_auth_is_rejected_with_expected_form(value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--gradio-auth", value])
    assert "user:password[,user2:password2]" in capsys.readouterr().err


def test_bad_port_and_choice(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--port", "99999"])
    assert "between 1 and 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])


def test_auth_path_file(tmp_path):
    f = tmp_path / "auth.txt"
    f.write_text("alice:one\nbob:two\n")
    opts = parse_args(["--gradio-auth", "carol:three", "--gradio-auth-path", str(f)])
    assert auth_list(opts) == [("carol", "three"), ("alice", "one"), ("bob", "two")]
    assert auth_list(parse_args(["--api-auth", "x:y"]), api=True) == [("x", "y")]


@pytest.mark.parametrize("content, line", [("alice:one\nbob\n", 2), ("alice:one, :nopass\n", 1),
                                           ("\n\ncarol:\n", 3), ("dave:x\r\neve;secret\r\n", 2)])
def test_malformed_auth_path_file_is_a_one_line_error(tmp_path, capsys, content, line):
    f = tmp_path / "auth.txt"
    f.write_bytes(content.encode())
    with pytest.raises(SystemExit) as exc:
        parse_args(["--gradio-auth-path", str(f)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launch.py: error: ")
    assert str(f) in err and f"line {line}" in err and "user:password" in err
    assert "secret" not in err and "one" not in err.split("error:")[1].replace("done", "")


def test_missing_or_empty_auth_path_file_is_a_one_line_error(tmp_path, capsys):
    for target, needle in ((tmp_path / "absent.txt", "does not exist"), (tmp_path / "empty.txt", "no credentials")):
        if needle == "no credentials":
            target.write_text("\n \n")
        with pytest.raises(SystemExit) as exc:
            parse_args(["--gradio-auth-path", str(target)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and str(target) in err and needle in err


def test_malformed_auth_path_file_through_launch_py(tmp_path):
    f = tmp_path / "auth.txt"
    f.write_text("alice:one\nbroken\n")
    out = subprocess.run([sys.executable, "launch.py", "--skip-install", "--data-dir", str(tmp_path / "d"),
                          "--gradio-auth-path", str(f)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"launch.py: error: --gradio-auth-path: {f}, line 2: malformed "
                                               "entry; expected user:password (entries separated by commas or "
                                               "newlines)"]


def test_help_lists_every_flag_with_help():
    parser = build_parser()
    help_text = parser.format_help()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in help_text
        assert action.help, f"{action.option_strings} has no help"


def test_launch_help_includes_extension_flag():
    out = subprocess.run([sys.executable, "launch.py", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--example-greeting" in out.stdout and "--enable-insecure-extension-access" in out.stdout


def test_preparse_only_reads_location_flags():
    from modules.cli import preparse
    pre = preparse(["--data-dir", "/tmp/q", "--port", "1", "--disable-all-extensions"])
    assert pre.data_dir == "/tmp/q" and pre.disable_all_extensions
    assert isinstance(pre, argparse.Namespace)
