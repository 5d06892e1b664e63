"""Saved chats: round trip, listing, rename, delete, no overwrite, no path traversal, atomic writes."""
import json

import pytest

from modules.llm.chat_history import ChatNotFound, ChatStore, check_chat_id


@pytest.fixture
def store(tmp_path):
    return ChatStore(tmp_path / "chats")


MESSAGES = [{"role": "user", "content": "Hello there, how are you?"},
            {"role": "assistant", "content": "Fine, thanks. ☕", "meta": {"tokens": 5, "tokens_per_s": 12.5}}]


def test_create_load_round_trip(store):
    chat = store.create(MESSAGES, system_prompt="Be brief.", model="tiny")
    assert chat.title == "Hello there, how are you?"
    loaded = store.load(chat.id)
    assert loaded.messages == MESSAGES
    assert loaded.system_prompt == "Be brief." and loaded.model == "tiny"
    data = json.loads((store.folder / f"{chat.id}.json").read_text(encoding="utf-8"))
    assert data["version"] == 1 and data["messages"][1]["content"] == "Fine, thanks. ☕"


def test_list_newest_first_and_shows_broken_files(store):
    a = store.create([{"role": "user", "content": "first"}])
    b = store.create([{"role": "user", "content": "second"}])
    b.messages.append({"role": "assistant", "content": "x"})
    store.save(b)
    (store.folder / "broken.json").write_text("{not json", encoding="utf-8")
    listed = store.list()
    assert [c["id"] for c in listed if not c["error"]] == [b.id, a.id]
    broken = [c for c in listed if c["error"]]
    assert broken and broken[0]["id"] == "broken" and "not valid JSON" in broken[0]["error"]
    store.delete("broken")


def test_rename_and_title_collisions(store):
    a = store.create([{"role": "user", "content": "same"}])
    b = store.create([{"role": "user", "content": "same"}])
    assert (a.title, b.title) == ("same", "same (2)")  # new chats get a free title
    assert store.rename(a.id, "  Trip   planning ").title == "Trip planning"
    with pytest.raises(FileExistsError, match="already called 'Trip planning'"):
        store.rename(b.id, "Trip planning")
    assert store.load(b.id).title == "same (2)"
    with pytest.raises(ValueError, match="empty"):
        store.rename(a.id, "   ")


def test_create_refuses_existing_id(store):
    store.create(MESSAGES, chat_id="mine")
    with pytest.raises(FileExistsError, match="already exists"):
        store.create([{"role": "user", "content": "other"}], chat_id="mine")
    assert store.load("mine").messages == MESSAGES


def test_delete(store):
    chat = store.create(MESSAGES)
    store.delete(chat.id)
    assert not store.exists(chat.id)
    with pytest.raises(ChatNotFound):
        store.delete(chat.id)
    with pytest.raises(ChatNotFound):
        store.load(chat.id)


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "a\\b", "", ".hidden", "x" * 65, "con.json", None, 3])
def test_unsafe_ids_are_refused(store, tmp_path, bad):
    with pytest.raises(ValueError, match="invalid chat id"):
        check_chat_id(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError):
            store.load(bad)
        with pytest.raises(ValueError):
            store.delete(bad)
    assert not any(p.suffix == ".json" for p in tmp_path.iterdir())


def test_bad_messages_are_refused_before_writing(store):
    chat = store.create(MESSAGES)
    chat.messages.append({"role": "wizard", "content": 3})
    with pytest.raises(ValueError, match="message 2"):
        store.save(chat)
    assert store.load(chat.id).messages == MESSAGES


def test_failed_write_leaves_old_file_and_no_temp(store, monkeypatch):
    chat = store.create(MESSAGES)
    chat.messages.append({"role": "user", "content": "more"})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("modules.llm.chat_history.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save(chat)
    monkeypatch.undo()
    assert store.load(chat.id).messages == MESSAGES
    assert [p.name for p in store.folder.iterdir()] == [f"{chat.id}.json"]
