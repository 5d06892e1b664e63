"""Chat templates render exactly as transformers' apply_chat_template, and the BOS convention holds."""
import json

import pytest

from modules.fixtures.llm import FIXTURE_MODELS, write_model
from modules.llm.chat_template import (BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError, load_chat_template,
                                       prompt_ids)
from modules.llm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a joke."}],
    "multi": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hello  there \n"},
              {"role": "assistant", "content": "Hi! How can I help?"},
              {"role": "user", "content": "Café ☕ and 😀, 42 times."}],
}

CUSTOM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
          "{{ raise_exception('tools are not supported') }}{% endif %}\n"
          "  [{{ m['role'] | upper }}] {{ m['content'] | tojson }}\n{% endfor %}"
          "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("chat") / "tiny", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.fixture(scope="module")
def hf_tok(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def hf_ids(hf_tok, messages, template, add_generation_prompt):
    out = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=True,
                                     add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES) + ["custom"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_and_ids_equal_transformers(folder, hf_tok, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    source = CUSTOM if name == "custom" else BUILTIN_TEMPLATES[name]
    template = ChatTemplate(source)
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(messages, chat_template=source, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    ref = hf_ids(hf_tok, messages, source, add_generation_prompt)
    ours = prompt_ids(Tokenizer.from_dir(folder), template, text)
    if text.startswith("<s>"):                 # the template wrote BOS: no second one (llama2, custom)
        assert ours == ref
    else:                                      # tinyllama, chatml: the tokenizer adds exactly one
        assert ours == [1] + ref
    assert ours.count(1) == text.count("<s>") + (0 if text.startswith("<s>") else 1)


def test_tinyllama_template_from_tokenizer_config(folder):
    template = load_chat_template(folder)
    assert template.origin == "tokenizer_config.json" and template.source == BUILTIN_TEMPLATES["tinyllama"]
    text = template.render([{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nSYS</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = prompt_ids(Tokenizer.from_dir(folder), template, text)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 2


def test_fallbacks_and_named_templates(tmp_path):
    assert load_chat_template(tmp_path).origin == "builtin:tinyllama"
    assert load_chat_template(tmp_path, fallback="chatml").source == BUILTIN_TEMPLATES["chatml"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|end|>"}, "chat_template": [{"name": "tool_use", "template": "x"},
                                                                {"name": "default", "template": CUSTOM}]}))
    template = load_chat_template(tmp_path)
    assert template.source == CUSTOM and template.eos_token == "<|end|>"
    with pytest.raises(ValueError, match="Unknown builtin"):
        ChatTemplate.builtin("vicuna")


def test_raise_exception_and_syntax_errors(hf_tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        ChatTemplate.builtin("llama2").render(bad)
    with pytest.raises(Exception, match="alternate"):          # transformers refuses the same input
        hf_tok.apply_chat_template(bad, chat_template=BUILTIN_TEMPLATES["llama2"], tokenize=False)
    with pytest.raises(ChatTemplateError, match="tools are not supported"):
        ChatTemplate(CUSTOM).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="syntax"):
        ChatTemplate("{% for m in messages %}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="role"):
        ChatTemplate(CUSTOM).render(["just a string"])
