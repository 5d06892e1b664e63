"""SFT data: the loss mask covers exactly the assistant spans (transformers' reference), and bad files fail
with every problem named."""
from __future__ import annotations

import json

import pytest

from modules.fixtures.llm import FIXTURE_MODELS, write_model
from modules.llm.chat_template import ChatTemplate, load_chat_template
from modules.llm.tokenizer import Tokenizer
from modules.training.llm.sft_data import (IGNORE, SFTDataError, build_examples, read_conversations,
                                           tokenize_conversation)

# A chat template whose generation prompt is the assistant header; the reference copy marks content plus
# end-of-turn with {% generation %}, as chat templates written for return_assistant_tokens_mask do.
TAGGED = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
UNTAGGED = TAGGED.replace("{% generation %}", "").replace("{% endgeneration %}", "")

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you today?"},
     {"role": "assistant", "content": "I am fine, thank you for asking."}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Because air scatters blue light more than red light."},
     {"role": "user", "content": "Thank you."}, {"role": "assistant", "content": "You are welcome. Good night."}],
    [{"role": "user", "content": "Größe, 12345?"}, {"role": "assistant", "content": "Café naïve 6789"}],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("sftdata") / "tiny", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_mask_equals_transformers_assistant_tokens_mask(folder, messages):
    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = hf_tok.apply_chat_template(messages, chat_template=TAGGED, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    ids, mask = tokenize_conversation(Tokenizer.from_dir(folder), ChatTemplate(UNTAGGED), messages)
    # Our BOS convention: one <s> in front of what transformers tokenizes (the template writes none)
    assert ids[0] == 1 and ids[1:] == list(ref["input_ids"])
    assert [int(m) for m in mask[1:]] == list(ref["assistant_masks"])
    assert sum(mask) > 0


@pytest.mark.parametrize("builtin, end_of_turn", [(None, "</s>"), ("chatml", "<|im_end|>")])
def test_builtin_template_mask_is_what_the_model_generates(folder, builtin, end_of_turn):
    """After the generation prompt the model writes the reply and the end-of-turn token: exactly those are
    learnt; the newline a template writes after the end-of-turn token is not (generation stops there)."""
    tokenizer = Tokenizer.from_dir(folder)
    template = ChatTemplate.builtin(builtin) if builtin else load_chat_template(folder)   # None: TinyLlama's
    messages = CONVERSATIONS[1]
    ids, mask = tokenize_conversation(tokenizer, template, messages)
    runs, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [tokenizer.decode(run, skip_special_tokens=False) for run in runs]
    assert decoded == [messages[1]["content"] + end_of_turn, messages[3]["content"] + end_of_turn]


def test_examples_shift_labels_and_skip_long_conversations(folder, tmp_path, caplog):
    tokenizer, template = Tokenizer.from_dir(folder), load_chat_template(folder)
    path = tmp_path / "chats.jsonl"
    long = {"prompt": "The quick brown fox " * 40, "response": "ok"}
    path.write_text("\n".join(json.dumps(r) for r in [{"messages": CONVERSATIONS[0]}, long,
                                                       {"prompt": "Hi", "response": "Hello!"}]) + "\n")
    conversations = read_conversations(path)
    assert [line for line, _ in conversations] == [1, 2, 3]
    examples = build_examples(conversations, tokenizer, template, seq_len=64, source=str(path))
    assert [e.line for e in examples] == [1, 3]
    assert "skipped 1 conversation(s) longer than seq_len=64" in caplog.text
    ids, mask = tokenize_conversation(tokenizer, template, conversations[2][1])
    example = examples[1]
    assert example.ids == ids[:-1]
    assert example.labels == [ids[k + 1] if mask[k + 1] else IGNORE for k in range(len(ids) - 1)]
    learnt = [label for label in example.labels if label != IGNORE]
    assert learnt[-1] == tokenizer.eos_id                     # the reply's </s> is learnt ...
    assert example.labels[-1] == IGNORE                       # ... the template's newline after it is not
    with pytest.raises(SFTDataError, match="every conversation is longer than seq_len=8"):
        build_examples(conversations, tokenizer, template, seq_len=8, source=str(path))


def test_bad_files_name_every_problem(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SFTDataError, match="no conversations"):
        read_conversations(empty)
    with pytest.raises(SFTDataError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"text": "no messages here"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "{not json",
        json.dumps({"prompt": "only a prompt"}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"prompt": "fine", "response": "fine"}),
    ]))
    with pytest.raises(SFTDataError) as info:
        read_conversations(bad)
    message = str(info.value)
    assert "5 bad line(s)" in message
    assert "line 1: no 'messages'" in message
    assert "line 2: no assistant turn" in message
    assert "line 3: not valid JSON" in message
    assert "line 4: a prompt/response line needs both" in message
    assert "line 5: messages[0] must be" in message
    assert "line 6" not in message
