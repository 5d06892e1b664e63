"""The Train tab in headless Chromium against the real server: start a tiny pretraining run, watch its
progress and plots move (and come back after a page reload), stop it, resume it to the end, and "Load in
Chat" its final model, which the Chat tab's model dropdown then lists and which replies there."""
import re
import time

import pytest

from server_utils import open_page, start_server
from training.training_corpus import write_corpus

RUN = "browser-run"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.training.llm.data import DataSource, build_dataset
    from modules.training.llm.tokenizer_train import train_tokenizer
    data = tmp_path_factory.mktemp("browser-train")
    corpus = write_corpus(data / "corpus")
    out = data / "training" / "data" / "tiny"
    files = sorted(p for p in (data / "corpus").rglob("*") if p.suffix in (".txt", ".md", ".py"))
    tokenizer = train_tokenizer(files, 400, out / "tokenizer")
    build_dataset([DataSource(name="text", paths=[str(corpus["text"]), str(corpus["code"])])], tokenizer, 16, out,
                  val_fraction=0.2)
    srv = start_server(data)
    yield srv, data
    srv.stop()


def pick(page, dropdown, option):
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, name, value):
    page.locator(f"#train_{name} input[type=number]").fill(str(value))


def progress(page) -> str:
    return page.locator("#train_progress").inner_text()


def wait_progress(page, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = progress(page)
        if re.search(pattern, text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"progress never matched {pattern!r}; last: {text!r}")


def step_of(text: str) -> int:
    return int(re.search(r"step (\d+)/", text).group(1))


def open_train(page):
    page.get_by_role("tab", name="Train", exact=True).click()
    page.locator("#train_start").wait_for()


def test_start_watch_stop_resume_and_load_in_chat(server):
    srv, data = server
    extra = "precision=fp32\ndevice=cpu\neval_batches=2"
    with open_page(srv.url) as page:
        open_train(page)
        pick(page, "#train_dataset", "tiny")
        pick(page, "#train_size", "tiny-gqa")
        page.get_by_text("Hyper-parameters").click()
        for name, value in dict(micro_batch=4, global_batch_tokens=128, max_steps=100000, warmup_steps=2,
                                eval_every=25, log_every=1).items():
            set_number(page, name, value)
        page.locator("#train_extra textarea").fill(extra)
        page.locator("#train_run_name textarea, #train_run_name input").first.fill(RUN)
        page.locator("#train_start").click()
        first = wait_progress(page, rf"{RUN}: training — step [1-9]\d*/100000 .*ETA")
        # the orange (validation) line of the loss plot has points: vega draws each series as one path
        validation_drawn = ("Array.from(document.querySelectorAll('#train_plot_loss .mark-line path')).some("
                            "p => p.getAttribute('stroke') === '#f58518' && (p.getAttribute('d') || '').length > 0)")
        later = wait_progress(page, rf"step (?!{step_of(first)}/)\d+/")          # the timer keeps polling
        assert step_of(later) > step_of(first)
        assert page.locator("#train_plot_loss canvas, #train_plot_loss svg").count() > 0
        # validation points join the live plot without a reload (the chart was first drawn with train points only)
        page.wait_for_function(validation_drawn, timeout=60_000)
        assert 0 < float(page.locator("#train_progress progress").get_attribute("value")) < 1

        page.reload(wait_until="load")                                         # mid-run: comes back
        page.wait_for_selector("#tabs")
        open_train(page)
        again = wait_progress(page, rf"{RUN}: training — step \d+/")
        assert step_of(again) >= step_of(later)

        page.locator("#train_stop").click()
        stopped = wait_progress(page, rf"{RUN}: stopped")
        page.get_by_text("Hyper-parameters").click()
        page.locator("#train_extra textarea").fill(f"{extra}\nmax_steps={step_of(stopped) + 3}")
        page.locator("#train_resume").click()
        done = wait_progress(page, rf"{RUN}: finished")
        page.get_by_text("Checkpoints").first.wait_for()
        assert "final" in page.locator("#train_checkpoints").inner_text()
        assert step_of(done) == step_of(stopped) + 3

        pick(page, "#train_checkpoint", "final")
        page.locator("#train_load_in_chat").click()
        page.wait_for_function(f"document.querySelector('#train_checkpoint_message').innerText"
                               f".includes('models/LLM/{RUN}')")
        assert (data / "models" / "LLM" / RUN / "config.json").is_file()

        page.get_by_role("tab", name="Chat", exact=True).click()
        pick(page, "#chat_model", RUN)                          # listed, and it chats
        page.locator("#chat_input textarea").fill("hello")
        page.locator("#chat_send").click()
        page.locator("#chat_chatbot .message.bot").first.wait_for()
