import subprocess
import textwrap

import pytest

from modules.extensions import loader

GOOD = '''
from modules.settings import SettingSpec, SettingsSection
from modules.tabs import TabSpec
from modules.extensions.scripts import Script, AlwaysVisible

class Upper(Script):
    def title(self): return "Upper"
    def show(self, tab): return AlwaysVisible
    def process(self, p, enabled=False):
        if enabled: p["prompt"] = p["prompt"].upper()

def setup(ext):
    ext.on("on_ui_tabs", lambda ctx: [TabSpec("good_tab", "Good tab", lambda ctx: None)])
    ext.on("on_ui_settings", lambda ctx: [SettingsSection("good", "Good", [SettingSpec("good.level", 3, "Level", int)])])
    ext.on("on_chat_message", lambda **kw: kw["content"][::-1])
'''

PRELOAD = '''
def preload(parser):
    parser.add_argument("--good-flag", default="x", help="a flag from an extension")
'''


def write_ext(root, name, script=None, preload=None, metadata=None):
    folder = root / "extensions" / name
    (folder / "scripts").mkdir(parents=True)
    if script is not None:
        (folder / "scripts" / "main.py").write_text(textwrap.dedent(script))
    if preload:
        (folder / "preload.py").write_text(preload)
    if metadata:
        (folder / "metadata.ini").write_text(metadata)
    return folder


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    write_ext(d, "good", GOOD, PRELOAD, "[Extension]\nName = Good one\nOrder = 5\n")
    write_ext(d, "broken-import", "import no_such_module_xyz\n")
    write_ext(d, "raises", "def setup(ext):\n    ext.on('on_chat_message', lambda **kw: 1 / 0)\n"
                           "    ext.on('on_ui_tabs', lambda ctx: (_ for _ in ()).throw(RuntimeError('tab boom')))\n")
    write_ext(d, "needs-other", "x = 1\n", metadata="[Extension]\nRequires = not-installed\n")
    return d


def ctx_for(make_ctx, data, *flags):
    return make_ctx(*flags, data_dir=data, extensions=True)


def test_loader_reports_each_kind_of_extension(make_ctx, data):
    ctx = ctx_for(make_ctx, data)
    exts = {e.name: e for e in ctx.extensions.extensions}
    assert exts["good"].state == "loaded" and exts["good"].display_name == "Good one"
    assert exts["broken-import"].state == "error"
    assert "no_such_module_xyz" in exts["broken-import"].errors[0]
    assert exts["raises"].state == "error" and "tab boom" in " ".join(exts["raises"].errors)
    assert "not-installed" in exts["needs-other"].errors[0]
    assert exts["atelier-example"].state == "loaded"
    assert [e.name for e in ctx.extensions.extensions][0] == "good", "metadata Order sorts first"
    # the good extension's tab and setting exist; the app is still fine
    assert "good_tab" in ctx.tabs and "example" in ctx.tabs
    assert ctx.settings.get("good.level") == 3
    # a callback that raises is reported; the others still run
    results = ctx.callbacks.fire("on_chat_message", role="user", content="abc", chat_id="c", model="m", ctx=ctx)
    assert results == ["cba"]
    assert any(e.owner == "raises" and e.callback == "on_chat_message" for e in ctx.callbacks.errors)
    # Script API: keyword arguments by name
    p = {"prompt": "cat"}
    ctx.scripts.call("process", "txt2img", p, {"Upper": {"enabled": True}})
    assert p["prompt"] == "CAT"


def test_extension_flag_is_parsed_and_listed_in_help(data, capsys):
    from modules.cli import parse_args
    dirs = [e.path for e in loader.discover([(data / "extensions", "user")])]
    assert parse_args(["--good-flag", "yes"], extension_dirs=dirs).good_flag == "yes"
    with pytest.raises(SystemExit):
        parse_args(["--help"], extension_dirs=dirs)
    assert "a flag from an extension" in capsys.readouterr().out


def test_disable_all_and_disabled_setting(make_ctx, data):
    ctx = make_ctx("--disable-all-extensions", data_dir=data, extensions=True)
    assert all(e.state == "disabled" for e in ctx.extensions.extensions)
    assert "good_tab" not in ctx.tabs


def test_enable_disable_saved_in_settings(make_ctx, data):
    ctx = ctx_for(make_ctx, data)
    loader.set_enabled(ctx, "good", False)
    assert "good" in ctx.settings.get("extensions.disabled")
    ctx2 = ctx_for(make_ctx, data)
    assert ctx2.extensions.get("good").state == "disabled" and "good_tab" not in ctx2.tabs


def test_changes_refused_when_exposed(make_ctx, data):
    ctx = ctx_for(make_ctx, data, "--listen")
    with pytest.raises(PermissionError, match="exposed"):
        loader.set_enabled(ctx, "good", False)
    with pytest.raises(PermissionError, match="--enable-insecure-extension-access"):
        loader.install_from_git(ctx, "https://example.invalid/x.git")
    ok = ctx_for(make_ctx, data, "--listen", "--enable-insecure-extension-access")
    assert ok.extension_changes_allowed


def test_install_from_git_repo(make_ctx, data, tmp_path):
    src = tmp_path / "src-ext"
    (src / "scripts").mkdir(parents=True)
    (src / "scripts" / "hello.py").write_text("def setup(ext):\n    pass\n")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "."], check=True)
    subprocess.run(["git", "-C", str(src), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"], check=True)
    ctx = ctx_for(make_ctx, data)
    target = loader.install_from_git(ctx, f"file://{src}", name="hello-ext")
    assert (target / "scripts" / "hello.py").exists() and ctx.paths.inside_data(target)
    with pytest.raises(FileExistsError):
        loader.install_from_git(ctx, f"file://{src}", name="hello-ext")
    with pytest.raises(ValueError):
        loader.install_from_git(ctx, "--upload-pack=evil")


def test_install_py_is_run(tmp_path):
    d = tmp_path / "data"
    folder = write_ext(d, "with-installer", "x = 1\n")
    (folder / "install.py").write_text("open('installed.txt', 'w').write('yes')\n")
    bad = write_ext(d, "bad-installer", "x = 1\n")
    (bad / "install.py").write_text("raise SystemExit(3)\n")
    exts = loader.discover([(d / "extensions", "user")])
    problems = loader.run_installers(exts)
    assert (folder / "installed.txt").read_text() == "yes"
    assert len(problems) == 1 and "bad-installer" in problems[0] and "3" in problems[0]


FAILING_HOOKS = '''
from modules.extensions.scripts import Script, AlwaysVisible
from modules.tabs import TabSpec

class BadProcess(Script):
    def title(self): return "Bad process"
    def show(self, tab): return AlwaysVisible
    def process(self, p, **kw): raise RuntimeError("process boom")

class BadShow(Script):
    def title(self): return "Bad show"
    def show(self, tab): raise RuntimeError("show boom")

class BadTitle(Script):
    def title(self): raise RuntimeError("title boom")

def broken_tab(ctx):
    raise RuntimeError("build boom")

def setup(ext):
    ext.on("on_chat_message", lambda **kw: 1 / 0)
    ext.on("on_ui_settings", lambda ctx: (_ for _ in ()).throw(RuntimeError("settings boom")))
    ext.on("on_ui_tabs", lambda ctx: [TabSpec("bad_tab", "Bad tab", broken_tab)])
'''


@pytest.fixture
def hooks_data(tmp_path):
    d = tmp_path / "hooks-data"
    write_ext(d, "hooky", FAILING_HOOKS)
    write_ext(d, "setup-raises", "def setup(ext):\n    raise ValueError('setup boom')\n")
    write_ext(d, "import-raises", "raise ImportError('import boom')\n")
    return d


def test_hook_failed_logs_records_on_the_extension_and_reraises_under_test(caplog):
    from modules.extensions.callbacks import Callbacks
    errors = {"ext-a": []}
    callbacks = Callbacks()
    callbacks.bind_extensions(errors.get)
    with caplog.at_level("ERROR"):
        callbacks.hook_failed("ext-a", "on_image_saved", OSError("disk full"))
        callbacks.hook_failed("ext-a", "on_image_saved", OSError("disk full"))   # the same failure again
        callbacks.hook_failed("nobody", "on_image_saved", OSError("disk full"))  # no such extension: log only
    assert errors["ext-a"] == ["on_image_saved: OSError: disk full"], "recorded once on the extension's list"
    assert [(e.owner, e.callback) for e in callbacks.errors] == [("ext-a", "on_image_saved"), ("nobody", "on_image_saved")]
    assert sum("extension ext-a: on_image_saved raised OSError: disk full" in r.getMessage() for r in caplog.records) == 2
    strict = Callbacks(raise_errors=True)
    strict.bind_extensions(errors.get)
    with pytest.raises(OSError, match="quota"):
        strict.hook_failed("ext-a", "on_image_saved", OSError("quota"))
    assert "on_image_saved: OSError: quota" in errors["ext-a"], "recorded before it is re-raised"


def test_every_extension_hook_failure_lands_on_the_extensions_tab(make_ctx, hooks_data):
    pytest.importorskip("gradio")
    from modules.ui.app import build_ui
    from modules.ui.tabs.extensions import _rows
    ctx = make_ctx(data_dir=hooks_data, extensions=True)
    ctx.callbacks.fire("on_chat_message", role="user", content="x", chat_id="c", model="m", ctx=ctx)
    p = {"prompt": "cat"}
    ctx.scripts.call("process", "txt2img", p, {})
    ctx.scripts.selectable("txt2img")
    build_ui(ctx)
    hooky = ctx.extensions.get("hooky").errors
    for needle in ("on_chat_message: ZeroDivisionError", "script 'Bad process' process: RuntimeError: process boom",
                   "script BadShow show: RuntimeError: show boom", "loading script main.py: RuntimeError: title boom",
                   "on_ui_settings: RuntimeError: settings boom",
                   "building tab 'Bad tab': RuntimeError: build boom"):
        assert any(e.startswith(needle) for e in hooky), (needle, hooky)
    assert ctx.extensions.get("setup-raises").errors == ["setup() in scripts/main.py: ValueError: setup boom"]
    assert ctx.extensions.get("import-raises").errors == ["importing scripts/main.py: ImportError: import boom"]
    rows = {r[0]: r for r in _rows(ctx)}
    assert rows["hooky"][2] == "error" and "process boom" in rows["hooky"][3] and "build boom" in rows["hooky"][3]


HOOK_SOURCES = {"setup-raises": ("def setup(ext):\n    raise ValueError('setup boom')\n", "setup boom"),
                "import-raises": ("raise ImportError('import boom')\n", "import boom"),
                "hooky": (FAILING_HOOKS, "title boom")}


@pytest.mark.parametrize("name", sorted(HOOK_SOURCES))
def test_hook_errors_are_reraised_under_test(tmp_path, name):
    import webui
    from modules.cli import parse_args
    source, message = HOOK_SOURCES[name]
    write_ext(tmp_path / "d", name, source)
    with pytest.raises(Exception, match=message):
        webui.prepare(parse_args(["--data-dir", str(tmp_path / "d")]), raise_callback_errors=True)


def test_script_hooks_reraise_with_a_strict_policy(tmp_path):
    from modules.extensions.callbacks import Callbacks
    from modules.extensions.scripts import ScriptRunner
    (tmp_path / "s.py").write_text(FAILING_HOOKS.replace("class BadTitle(Script):", "class BadTitle:"))
    runner = ScriptRunner(report_error=Callbacks(raise_errors=True).hook_failed)
    runner.load_file(tmp_path / "s.py", owner="x")
    with pytest.raises(RuntimeError, match="show boom"):
        runner.selectable("txt2img")
