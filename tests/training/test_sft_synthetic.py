"""make-sft-data: deterministic per seed, the family counts asked for, drawing answers that are the caption of
the scene the request describes, docs answers that are verbatim excerpts of the docs, held-out items phrased
only with unseen templates, a strict exact-match scorer, and clear refusals of bad input."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from modules.shapes.vocabulary import (
    COLOURS,
    SHAPES,
    STYLES,
    caption,
    parse_caption,
    sample_scene,
)
from modules.training.__main__ import main
from modules.training.llm import doc_questions, drawing_requests, small_tasks
from modules.training.llm.doc_questions import collapse_whitespace, doc_facts
from modules.training.llm.drawing_requests import (
    COLOUR_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    STYLE_WORDS,
    drawing_request,
)
from modules.training.llm.sft_synthetic import (
    FAMILIES,
    SyntheticDataError,
    SyntheticSpec,
    default_docs,
    load_sft_items,
    make_sft_data,
    score_sft_predictions,
)

SMALL = {"drawing": 300, "arithmetic": 60, "formatting": 60, "held_out": 40}


def _question(item):
    return item["messages"][0]["content"]


def _answer(item):
    return item["messages"][1]["content"]


@pytest.fixture(scope="module")
def data():
    return make_sft_data(SyntheticSpec(docs=tuple(default_docs()), seed=5, **SMALL))


def test_cli_writes_the_same_bytes_for_a_seed_and_the_counts_asked_for(tmp_path, capsys):
    args = ["make-sft-data", "--seed", "3", "--drawing", "50", "--arithmetic", "20", "--formatting", "10",
            "--held-out", "8"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    for name in ("train.jsonl", "heldout.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(args[:2] + ["4"] + args[3:] + ["--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()

    train, held = load_sft_items(tmp_path / "a" / "train.jsonl"), load_sft_items(tmp_path / "a" / "heldout.jsonl")
    count = {split: {f: sum(i["family"] == f for i in items) for f in FAMILIES}
             for split, items in (("train", train), ("heldout", held))}
    assert count["train"]["drawing"] == 50 and count["train"]["arithmetic"] == 20
    assert count["train"]["formatting"] == 10 and count["train"]["docs"] > 100
    assert count["heldout"] == {f: 8 for f in FAMILIES}
    assert summary["counts"] == count
    assert [d["path"] for d in summary["docs"]] == ["README.md"] + sorted(
        str(p.relative_to(default_docs()[0].parent)) for p in default_docs()[1:])
    for item in train + held:
        assert [m["role"] for m in item["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in item["messages"])


def test_a_family_count_leaves_the_other_families_unchanged():
    docs = tuple(default_docs())
    a = make_sft_data(SyntheticSpec(docs=docs, seed=1, drawing=30, arithmetic=10, formatting=10, held_out=5))
    b = make_sft_data(SyntheticSpec(docs=docs, seed=1, drawing=60, arithmetic=10, formatting=10, held_out=5))
    def family(items, name):
        return sorted(json.dumps(i) for i in items if i["family"] == name)
    for name in ("docs", "arithmetic", "formatting"):
        assert family(a["train"], name) == family(b["train"], name)


def _mentioned(words: tuple[str, ...], text: str) -> int | None:
    """Where the first of ``words`` occurs in ``text`` as whole words, or None."""
    hits = [m.start() for w in words if w for m in [re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)] if m]
    return min(hits) if hits else None


def _assert_request_describes(request: str, scene):
    text = request.lower()
    for obj in scene.objects:
        for table, value in ((SIZE_WORDS, obj.size), (COLOUR_WORDS, obj.colour), (SHAPE_WORDS, obj.shape)):
            assert _mentioned(table[value], text) is not None, (request, value)
        assert any(phrase.lower() in text for phrase in POSITION_WORDS[obj.position]), (request, obj.position)
        outlined = _mentioned(STYLE_WORDS["outlined"], text) is not None
        assert outlined == any(o.style == "outlined" for o in scene.objects), request
    assert _mentioned(COLOUR_WORDS[scene.background], text) is not None, request
    named = {c for c in COLOURS if _mentioned(COLOUR_WORDS[c], text) is not None}
    assert named == {scene.background} | {o.colour for o in scene.objects}, request
    if len(scene.objects) == 2 and scene.objects[0].shape != scene.objects[1].shape:
        first, second = (_mentioned(SHAPE_WORDS[o.shape], text) for o in scene.objects)
        assert first < second, request            # objects are described in caption order


def test_drawing_requests_describe_the_scene_their_answer_parses_to(data):
    rng = random.Random(11)
    for held_out in (False, True):
        for _ in range(400):
            scene = sample_scene(rng, shapes=SHAPES, styles=STYLES)
            request, _ = drawing_request(scene, rng, held_out=held_out)
            _assert_request_describes(request, scene)
    drawing = [i for split in data.values() for i in split if i["family"] == "drawing"]
    for item in drawing:
        scene = parse_caption(_answer(item))
        assert caption(scene) == _answer(item)
        _assert_request_describes(_question(item), scene)
    assert any("hexagon" in _answer(i) for i in drawing) and any("outlined" in _answer(i) for i in drawing)
    assert {len(parse_caption(_answer(i)).objects) for i in drawing} == {1, 2}


def test_the_issue_example_is_in_the_grammar_of_requests():
    # "could you draw a big red circle up in the left corner on blue?" -> large red circle, top left, blue background
    frames = {t.text for t in drawing_requests.FRAMES if not t.held_out}
    assert "could you draw {scene}?" in frames and "up in the left corner" in POSITION_WORDS["top left"]
    assert "big" in SIZE_WORDS["large"] and "on {c}" in drawing_requests.BACKGROUND_FORMS
    for table, vocab in ((SIZE_WORDS, ("small", "large")), (COLOUR_WORDS, COLOURS), (SHAPE_WORDS, SHAPES),
                         (STYLE_WORDS, STYLES)):
        assert set(table) == set(vocab) and all(table[w] for w in vocab)


def test_docs_answers_are_verbatim_excerpts_of_the_docs(data):
    texts = [collapse_whitespace(p.read_text(encoding="utf-8")) for p in default_docs()]
    docs = [i for split in data.values() for i in split if i["family"] == "docs"]
    assert docs
    for item in docs:
        assert any(_answer(item) in text for text in texts), item
    questions = {_question(i): _answer(i) for i in data["train"] if i["family"] == "docs"}
    readme_row = next(line for line in default_docs()[0].read_text().splitlines() if line.startswith("| `--medvram`"))
    assert questions["What does --medvram do?"] == readme_row.split("|")[2].strip()
    assert questions["What do --medvram and --lowvram do?"] == questions["What does --medvram do?"]
    assert questions["What is Atelier?"].startswith("A local web UI in the AUTOMATIC1111 mould")


def test_doc_facts_read_tables_and_first_sentences_but_not_code(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("# Guide\n\nThe guide explains things, e.g. flags.\nIt wraps\nlines.\n\n"
                   "```\n| `--fake` | inside a code block |\n|---|---|\n```\n\n"
                   "## Options\n\n| flag | meaning |\n|---|---|\n| `--fast`, `--faster N` | go fast; `--faster` more |\n"
                   "| `--slow` | – |\n\n| round | tok/s |\n|---|---|\n| 1 | 5.5 |\n", encoding="utf-8")
    facts = doc_facts(doc)
    assert [(f.kind, f.subject, f.answer) for f in facts] == [
        ("section", "Guide", "The guide explains things, e.g. flags."),
        ("flag", "--fast", "go fast; `--faster` more"),
        ("flag", "--faster", "go fast; `--faster` more"),
        ("flag", "--fast and --faster", "go fast; `--faster` more"),
    ]
    assert facts[3].question(doc_questions.TEMPLATES["flag"][0]) == "What do --fast and --faster do?"


def test_held_out_items_use_only_templates_train_never_uses(data):
    train_templates = {(i["family"], i["template"]) for i in data["train"]}
    held_templates = {(i["family"], i["template"]) for i in data["heldout"]}
    assert not train_templates & held_templates
    assert {f for f, _ in held_templates} == set(FAMILIES) == {f for f, _ in train_templates}
    train_questions = {_question(i) for i in data["train"]}
    assert not any(_question(i) in train_questions for i in data["heldout"])
    held_frames = {t.id for t in drawing_requests.FRAMES if t.held_out}
    assert all(i["template"] in held_frames for i in data["heldout"] if i["family"] == "drawing")


def test_small_task_answers_are_right():
    rng = random.Random(2)
    for item in small_tasks.arithmetic_items(200, rng, held_out=False):
        a, op, b = re.search(r"(\d+) (\+|-|\*|plus|minus|times) (\d+)", _question(item)).groups()
        expected = {"+": int(a) + int(b), "plus": int(a) + int(b), "-": int(a) - int(b), "minus": int(a) - int(b),
                    "*": int(a) * int(b), "times": int(a) * int(b)}[op]
        assert _answer(item) == str(expected) and expected >= 0
    seen = set()
    for item in small_tasks.formatting_items(200, rng, held_out=True):
        task, text = item["template"].split("/")[0], _question(item).split(": ", 1)[1]
        seen.add(task)
        expected = _formatted(task, text)
        assert _answer(item) == expected and (expected != text or task == "sort")
    assert seen == {"upper", "lower", "reverse", "sort"}


def _formatted(task: str, text: str) -> str:
    if task == "upper":
        return text.upper()
    if task == "lower":
        return text.lower()
    if task == "reverse":
        return " ".join(text.split()[::-1])
    return ", ".join(map(str, sorted(map(int, text.split(", ")))))


def test_scorer_is_exact_match_per_family(data):
    items = data["heldout"]
    answers = [_answer(i) for i in items]
    assert score_sft_predictions(items, answers) == {f: 1.0 for f in FAMILIES}
    assert score_sft_predictions(items, [f"  {a}\n" for a in answers]) == {f: 1.0 for f in FAMILIES}
    drawing = [k for k, i in enumerate(items) if i["family"] == "drawing"]
    two = next(k for k in drawing if len(parse_caption(answers[k]).objects) == 2)
    wrong = list(answers)
    first, pos1, second, pos2, background = answers[two].split(", ")
    wrong[two] = f"{second}, {pos2}, {first}, {pos1}, {background}"      # the same picture, the wrong order
    for k in drawing[:9]:
        if k != two:
            wrong[k] = answers[k].replace("background", "backdrop")
    arithmetic = next(k for k, i in enumerate(items) if i["family"] == "arithmetic")
    wrong[arithmetic] = answers[arithmetic] + "."
    scores = score_sft_predictions(items, wrong)
    n_drawing = len(drawing)
    n_arith = sum(i["family"] == "arithmetic" for i in items)
    assert scores["drawing"] == pytest.approx((n_drawing - 10 + (two in drawing[:9])) / n_drawing)
    assert scores["arithmetic"] == pytest.approx((n_arith - 1) / n_arith)
    assert scores["docs"] == scores["formatting"] == 1.0
    with pytest.raises(SyntheticDataError, match="one prediction per item"):
        score_sft_predictions(items, answers[:-1])


def test_bad_input_is_refused_with_a_message_and_nothing_is_overwritten(tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["make-sft-data", "--out", str(out), "--drawing", "5", "--arithmetic", "5", "--formatting", "5",
                 "--held-out", "2"]) == 0
    before = (out / "train.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["make-sft-data", "--out", str(out), "--drawing", "9"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "train.jsonl").read_bytes() == before
    assert main(["make-sft-data", "--out", str(tmp_path / "x"), "--drawing", "-1",
                 "--docs", str(tmp_path / "missing.md")]) == 2
    err = capsys.readouterr().err
    assert "drawing must be a whole number >= 0" in err and "missing.md" in err
    assert not (tmp_path / "x").exists()
    empty = tmp_path / "empty.md"
    empty.write_text("```\ncode only\n```\n", encoding="utf-8")
    assert main(["make-sft-data", "--out", str(tmp_path / "y"), "--docs", str(empty)]) == 2
    assert "no questions could be read" in capsys.readouterr().err
    assert main(["make-sft-data", "--out", str(out), "--overwrite", "--drawing", "7", "--arithmetic", "5",
                 "--formatting", "5", "--held-out", "2"]) == 0
    assert sum(i["family"] == "drawing" for i in load_sft_items(out / "train.jsonl")) == 7
    assert not list(Path(out).glob("*.tmp"))
