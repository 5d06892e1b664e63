"""Saved chats: one JSON file per chat in the data dir's ``chats/`` folder.

A chat's file name is its id (``<id>.json``); ids are generated here or checked against a strict pattern,
so no name a user or client sends can leave the folder. Titles are free text and may be renamed, but two
chats never share a title (renaming onto another chat's title is refused rather than confusing the list).
Writes go to a temporary file in the same folder and are moved into place, so a crash never leaves a
half-written chat. Creating a chat with an id that already exists is refused: another chat is never
silently overwritten.

File format (version 1)::

    {"version": 1, "id": "...", "title": "...", "created": <unix s>, "updated": <unix s>,
     "model": "...", "system_prompt": "...",
     "messages": [{"role": "user"|"assistant", "content": "...", "meta": {...}}, ...]}
"""
from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_ROLES = ("system", "user", "assistant")
MAX_TITLE = 120


class ChatNotFound(KeyError):
    """No saved chat has this id."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0]) if self.args else "chat not found"


@dataclass
class Chat:
    id: str
    title: str = "New chat"
    messages: list[dict[str, Any]] = field(default_factory=list)
    system_prompt: str = ""
    model: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, source: str) -> "Chat":
        problems = []
        if not isinstance(data, dict):
            raise ValueError(f"chat file {source}: expected a JSON object, got {type(data).__name__}")
        messages = data.get("messages", [])
        if not isinstance(messages, list):
            problems.append("'messages' must be a list")
            messages = []
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                problems.append(f"message {i} must be {{'role': one of {_ROLES}, 'content': text}}, got {m!r:.80}")
                continue
            clean.append({"role": m["role"], "content": m["content"], **({"meta": m["meta"]}
                                                                          if isinstance(m.get("meta"), dict) else {})})
        if problems:
            raise ValueError(f"chat file {source}: " + "; ".join(problems))
        return cls(id=str(data.get("id", "")), title=str(data.get("title") or "Untitled"), messages=clean,
                   system_prompt=str(data.get("system_prompt") or ""), model=str(data.get("model") or ""),
                   created=float(data.get("created") or 0), updated=float(data.get("updated") or 0))


def check_chat_id(chat_id: Any) -> str:
    """Return *chat_id* if it is a safe file stem, else raise ValueError saying what is allowed."""
    if not isinstance(chat_id, str) or not _ID_PATTERN.match(chat_id):
        raise ValueError(f"invalid chat id {chat_id!r}: use 1-64 letters, digits, '-' or '_' "
                         "(starting with a letter or digit)")
    return chat_id


def new_chat_id() -> str:
    """Sortable by creation time, unique without coordination: ``20260127-003712-3f9a1c``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def title_from(messages: list[dict[str, Any]]) -> str:
    """A default title: the start of the first user message."""
    for m in messages:
        if m.get("role") == "user" and m.get("content", "").strip():
            text = " ".join(m["content"].split())
            return text[:60] + ("…" if len(text) > 60 else "")
    return "New chat"


class ChatStore:
    """Saved chats in one folder. Thread-safe within the process (the UI and API share one store)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._lock = threading.RLock()

    def _path(self, chat_id: str) -> Path:
        return self.folder / f"{check_chat_id(chat_id)}.json"

    # -- reading ---------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        """Summaries of every readable chat, most recently updated first. Unreadable files are listed
        with an ``error`` so the user can see (and delete) them."""
        out = []
        if not self.folder.is_dir():
            return out
        for path in self.folder.glob("*.json"):
            if not _ID_PATTERN.match(path.stem):
                continue
            try:
                chat = self.load(path.stem)
                out.append({"id": chat.id, "title": chat.title, "updated": chat.updated,
                            "messages": len(chat.messages), "model": chat.model, "error": None})
            except (OSError, ValueError) as exc:
                out.append({"id": path.stem, "title": path.stem, "updated": path.stat().st_mtime,
                            "messages": 0, "model": "", "error": str(exc)})
        return sorted(out, key=lambda c: c["updated"], reverse=True)

    def exists(self, chat_id: str) -> bool:
        return self._path(chat_id).is_file()

    def load(self, chat_id: str) -> Chat:
        path = self._path(chat_id)
        if not path.is_file():
            raise ChatNotFound(f"no saved chat with id {chat_id!r} in {self.folder}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"chat file {path} is not valid JSON ({exc}); delete it or fix it by hand") from exc
        chat = Chat.from_json(data, str(path))
        chat.id = chat_id  # the file name is the identity, whatever the content says
        return chat

    # -- writing ----------------------------------------------------------------------------------
    def create(self, messages: list[dict[str, Any]] | None = None, *, title: str | None = None,
               system_prompt: str = "", model: str = "", chat_id: str | None = None) -> Chat:
        """Save a new chat. Refuses an id that is already taken."""
        with self._lock:
            if chat_id is None:
                chat_id = new_chat_id()
                while self.exists(chat_id):  # two chats created in the same second
                    chat_id = new_chat_id()
            elif self.exists(check_chat_id(chat_id)):
                raise FileExistsError(f"a chat with id {chat_id!r} already exists; load it or pick another id")
            messages = list(messages or [])
            chat = Chat(id=chat_id, title=self._unique_title(self._clean_title(title or title_from(messages))),
                        messages=messages, system_prompt=system_prompt, model=model)
            self._write(chat)
            return chat

    def save(self, chat: Chat) -> Chat:
        """Write *chat* over its own file (creating it if new); bumps ``updated``."""
        with self._lock:
            check_chat_id(chat.id)
            Chat.from_json(chat.to_json(), f"chat {chat.id}")  # validate messages before touching the disk
            chat.title = self._clean_title(chat.title)
            self._check_title_free(chat.title, chat.id)
            chat.updated = time.time()
            self._write(chat)
            return chat

    def rename(self, chat_id: str, title: str) -> Chat:
        """Change a chat's title; refuses a title another chat already has."""
        with self._lock:
            chat = self.load(chat_id)
            chat.title = self._clean_title(title)
            return self.save(chat)

    def delete(self, chat_id: str) -> None:
        with self._lock:
            path = self._path(chat_id)
            if not path.is_file():
                raise ChatNotFound(f"no saved chat with id {chat_id!r} in {self.folder}")
            path.unlink()

    # -- internals -----------------------------------------------------------------------------------
    @staticmethod
    def _clean_title(title: str) -> str:
        title = " ".join(str(title or "").split())[:MAX_TITLE]
        if not title:
            raise ValueError("a chat title cannot be empty")
        return title

    def _others_with_title(self, title: str, chat_id: str | None) -> list[str]:
        return [c["id"] for c in self.list() if c["title"] == title and c["id"] != chat_id]

    def _check_title_free(self, title: str, chat_id: str) -> None:
        taken = self._others_with_title(title, chat_id)
        if taken:
            raise FileExistsError(f"another chat ({taken[0]}) is already called {title!r}; pick another title")

    def _unique_title(self, title: str) -> str:
        """A new chat's default title, with " (2)", " (3)" ... added when it is taken."""
        candidate, n = title, 2
        while self._others_with_title(candidate, None):
            candidate, n = f"{title} ({n})", n + 1
        return candidate

    def _write(self, chat: Chat) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(chat.id)
        fd, tmp = tempfile.mkstemp(prefix=f".{chat.id}-", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(chat.to_json(), fh, ensure_ascii=False, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- editing a conversation (pure functions used by the Chat tab) ------------------------------------------

def without_last_exchange(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Remove the last user message and the replies after it ("Remove last"); returns the shortened list and
    the removed user text (to put back in the input box)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return list(messages[:i]), messages[i].get("content", "")
    return [m for m in messages if m.get("role") == "system"], ""


def for_regenerate(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation without its last reply(ies), ending with the user message to answer again."""
    trimmed = list(messages)
    while trimmed and trimmed[-1].get("role") == "assistant":
        trimmed.pop()
    if not trimmed or trimmed[-1].get("role") != "user":
        raise ValueError("nothing to regenerate: send a message first")
    return trimmed


def check_continuable(messages: list[dict[str, Any]]) -> None:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("nothing to continue: the last message must be a reply (send a message first)")
