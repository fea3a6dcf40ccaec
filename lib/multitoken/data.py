"""MetaMathQA data: hub / local JSON(L) / offline generator, tokenizer, prompt formatting, label masking, loaders."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from .synthetic import generate_records
from .utils import note_written

HUB_DATASET = "meta-math/MetaMathQA"
EOS, PAD = "<|endoftext|>", "<|pad|>"
# MetaMath's Alpaca-style training prompt; the loss is on the response only.
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{query}\n\n### Response:\n")
REQUIRED = ("query", "response")
FIELDS = ("query", "response", "type", "original_question")
# data/gsm8k beside lib/ (an editable install) or under the working directory's repo root
GSM8K_DIR = Path(__file__).resolve().parents[2] / "data" / "gsm8k"
_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"^####\s*(.+?)\s*$")


PROMPT_FORMATS = ("alpaca", "chat")


def format_prompt(query: str, tokenizer=None, style: str | None = None) -> str:
    """The prompt for ``query``: MetaMath's Alpaca-style prompt (``alpaca``, the thesis'), or the tokenizer's own chat
    template, one user turn then the assistant's (``chat``: what an instruction-tuned model such as
    SmolLM2-135M-Instruct was trained on). ``style`` defaults to the tokenizer's ``workbook_prompt`` (set by
    :func:`set_prompt_format`), else ``alpaca``."""
    style = style or getattr(tokenizer, "workbook_prompt", "alpaca")
    if style == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                             add_generation_prompt=True)
    return PROMPT.format(query=query)


def set_prompt_format(tokenizer, style: str):
    """Make ``style`` the prompt format every later ``format_prompt(query, tokenizer)`` uses with this tokenizer."""
    if style not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {style!r}: one of {PROMPT_FORMATS}")
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template (this one has none); use "
                         "'alpaca'")
    tokenizer.workbook_prompt = style
    return tokenizer


def read_records(path: str | Path) -> list[dict]:
    """Records from a MetaMathQA-schema JSON list or JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
        numbered = list(enumerate(rows, 1))
        where = "record"
    else:
        numbered, where = [], "line"
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i} is not valid JSON: {e.msg}") from e
    records = []
    for i, row in numbered:
        missing = [k for k in REQUIRED if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}: {where} {i} lacks field(s) {missing} (MetaMathQA schema: query, response)")
        records.append({k: row.get(k, "") or "" for k in FIELDS})
    return records


def gsm8k_to_metamathqa(question: str, answer: str, where: str = "record") -> dict:
    """One GSM8K record in MetaMathQA's schema: the solution without ``<<...>>`` calculator annotations, its last
    line ``#### N`` written as ``The answer is: N`` (thousands separators dropped, as MetaMathQA writes numbers)."""
    lines = answer.rstrip().split("\n")
    m = _FINAL.match(lines[-1].strip())
    if not m:
        raise ValueError(f"{where}: answer has no final '#### <number>' line")
    final = m.group(1).replace(",", "")
    try:
        float(final)
    except ValueError:
        raise ValueError(f"{where}: final answer {m.group(1)!r} is not a number") from None
    steps = [_CALC.sub("", line).rstrip() for line in lines[:-1]]
    return {"query": question.strip(), "response": "\n".join(steps + [f"The answer is: {final}"]),
            "type": "GSM_Original", "original_question": question.strip()}


def read_gsm8k(path: str | Path) -> list[dict]:
    """A GSM8K JSONL file (``question``, ``answer``) converted to MetaMathQA records; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}. The workbook ships GSM8K under data/gsm8k/ "
                                "(train.jsonl, test.jsonl, LICENSE); restore it with `git checkout data/gsm8k`")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i} is not valid JSON: {e.msg}") from e
        missing = [k for k in ("question", "answer") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}: line {i} lacks field(s) {missing} (GSM8K schema: question, answer)")
        out.append(gsm8k_to_metamathqa(row["question"], row["answer"], where=f"{path}: line {i}"))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def load_metamathqa(source: str = "synthetic", max_examples: int | None = None, seed: int = 0,
                    val_fraction: float = 0.1, test_examples: int | None = None,
                    first_examples: bool = False) -> DatasetDict:
    """MetaMathQA as a ``DatasetDict`` with ``train`` and ``validation`` (and ``test`` for GSM8K).

    ``source``: ``"synthetic"`` (offline generator), ``"hub"`` (``meta-math/MetaMathQA``), ``"gsm8k"`` (the GSM8K
    release shipped in ``data/gsm8k``; ``"gsm8k:/other/dir"`` for another copy), or a JSON/JSONL path.
    For GSM8K the official test set is the ``test`` split (the first ``test_examples`` of it, in file order) and
    ``validation`` is carved out of train with ``seed``; ``max_examples`` caps train + validation: a seeded sample,
    or with ``first_examples`` the first records in the source's order (what the thesis' code did).
    """
    from datasets import Dataset, DatasetDict, load_dataset  # here: the GPU check runs without `datasets`

    test = None
    if source == "gsm8k" or source.startswith("gsm8k:"):
        folder = Path(source.split(":", 1)[1]) if ":" in source else GSM8K_DIR
        ds = Dataset.from_list(read_gsm8k(folder / "train.jsonl"))
        test = read_gsm8k(folder / "test.jsonl")
        test = Dataset.from_list(test[:test_examples] if test_examples else test)
    elif source == "synthetic":
        records = generate_records(max_examples or 2000, seed=seed)
        ds = Dataset.from_list([{k: r[k] for k in FIELDS} for r in records])
    elif source == "hub":
        ds = load_dataset(HUB_DATASET, split="train")
    else:
        ds = Dataset.from_list(read_records(source))
    ds = ds.filter(lambda r: bool(r["query"].strip()) and bool(r["response"].strip()))
    if max_examples is not None and len(ds) > max_examples:
        ds = (ds if first_examples else ds.shuffle(seed=seed)).select(range(max_examples))
    if len(ds) < 2:
        raise ValueError(f"dataset from {source!r} has {len(ds)} usable records after filtering; need at least 2")
    n_val = max(1, int(round(len(ds) * val_fraction)))
    split = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    out = DatasetDict(train=split["train"], validation=split["test"])
    if test is not None:
        out["test"] = test
    return out


def build_tokenizer(train_texts=None, name: str | None = None, vocab_size: int = 4096,
                    save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The pretrained tokenizer ``name`` (a registry name such as ``"smollm2-135m-instruct"``, a local directory, a hub
    name such as ``"gpt2"``), or a byte-level BPE trained on ``train_texts``.

    Either way the tokenizer has an EOS and a pad token. A pretrained tokenizer's own pad token is kept even when it
    is its EOS (SmolLM2: ``<|im_end|>``): the collator builds labels from lengths, so padding never hides the end of a
    response, and adding a token would resize the pretrained model's embeddings. One without (GPT-2) gets ``<|pad|>``.
    """
    if name:
        from .core.pretrained import load_tokenizer

        tok = load_tokenizer(str(name))
        if tok.eos_token is None:
            tok.add_special_tokens({"eos_token": EOS})
    else:
        if train_texts is None:
            raise ValueError("build_tokenizer needs train_texts to train a BPE tokenizer (or a pretrained name)")
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(train_texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                show_progress=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD})
    tok.padding_side = "right"
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def encode_examples(queries, responses, tokenizer, max_seq_len: int = 512, style: str | None = None) -> dict:
    """Prompt (:func:`format_prompt`) + response + EOS, truncated to ``max_seq_len``; labels are -100 on the prompt.
    Column lists (``input_ids``, ``labels``, ``prompt_len``), as ``datasets.map(batched=True)`` wants them."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([format_prompt(q, tokenizer, style) for q in queries], add_special_tokens=False)["input_ids"]
    answers = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "labels": [], "prompt_len": []}
    for p, a in zip(prompts, answers):
        out["input_ids"].append((p + a + [eos])[:max_seq_len])
        out["labels"].append(([-100] * len(p) + a + [eos])[:max_seq_len])
        out["prompt_len"].append(min(len(p), max_seq_len))
    return out


def tokenize_dataset(ds, tokenizer, max_seq_len: int = 512, style: str | None = None):
    """:func:`encode_examples` over a ``Dataset`` or ``DatasetDict`` (examples whose prompt fills the whole length
    are dropped)."""
    from datasets import DatasetDict

    def encode(batch):
        return encode_examples(batch["query"], batch["response"], tokenizer, max_seq_len, style)

    cols = ds["train"].column_names if isinstance(ds, DatasetDict) else ds.column_names
    out = ds.map(encode, batched=True, remove_columns=cols, desc="tokenize")
    # a prompt that fills max_seq_len leaves nothing to learn (and a NaN loss): drop such examples
    out = out.filter(lambda ex: ex["prompt_len"] < len(ex["labels"]), desc="drop prompt-only")
    for name, part in (out.items() if isinstance(out, DatasetDict) else [("dataset", out)]):
        if len(part) == 0:
            raise ValueError(f"{name}: every prompt is at least max_seq_len={max_seq_len} tokens long; "
                             "raise max_seq_len")
    return out


class Collator:
    """Right-pads a batch; labels are -100 on padding (built from lengths, not from the pad id)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        cpu = torch.device("cpu")  # batches are built on the CPU; the Trainer / evaluation move them
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long, device=cpu)
        labels = torch.full((len(features), width), -100, dtype=torch.long, device=cpu)
        mask = torch.zeros((len(features), width), dtype=torch.long, device=cpu)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"], device=cpu)
            labels[i, :n] = torch.tensor(f["labels"], device=cpu)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_max_seq_len(max_seq_len: int, n_positions: int):
    if max_seq_len > n_positions:
        raise ValueError(f"max_seq_len={max_seq_len} is above the model's context n_positions={n_positions}")


def make_dataloader(tokenized, tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0):
    """Batches of a tokenized ``Dataset`` (or a list of ``{"input_ids", "labels"}`` records), right-padded."""
    keep = tokenized if isinstance(tokenized, list) else tokenized.remove_columns(
        [c for c in tokenized.column_names if c not in ("input_ids", "labels")])
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(keep, batch_size=batch_size, shuffle=shuffle, collate_fn=Collator(tokenizer.pad_token_id),
                      generator=gen)


def preprocess_data(model_name: str | None = "gpt2", max_seq_len: int = 512, train_batch_size: int = 4,
                    val_batch_size: int = 4, max_examples: int | None = 500, source: str = "hub", seed: int = 0,
                    vocab_size: int = 4096, tokenizer=None, n_positions: int | None = None):
    """The thesis' entry point: ``(train_dataloader, val_dataloader, tokenizer)``.

    ``model_name`` names the pretrained tokenizer/config (hub name or local directory); ``None`` trains a BPE.
    """
    if n_positions is None and model_name:
        from .core.pretrained import model_dir

        n_positions = AutoConfig.from_pretrained(model_dir(model_name)).max_position_embeddings
    if n_positions is not None:
        check_max_seq_len(max_seq_len, n_positions)
    ds = load_metamathqa(source, max_examples=max_examples, seed=seed)
    if tokenizer is None:
        texts = (format_prompt(q) + r for q, r in zip(ds["train"]["query"], ds["train"]["response"]))
        tokenizer = build_tokenizer(texts, name=model_name, vocab_size=vocab_size)
    tok = tokenize_dataset(ds, tokenizer, max_seq_len)
    return (make_dataloader(tok["train"], tokenizer, train_batch_size, shuffle=True, seed=seed),
            make_dataloader(tok["validation"], tokenizer, val_batch_size), tokenizer)


def create_custom_dataloader(dataset_path, tokenizer, max_seq_len: int = 512, batch_size: int = 4):
    """A loader over your own MetaMathQA-schema JSON/JSONL file (all records, in file order)."""
    from datasets import Dataset

    ds = Dataset.from_list(read_records(dataset_path))
    return make_dataloader(tokenize_dataset(ds, tokenizer, max_seq_len), tokenizer, batch_size)


def more_prompts(source: str, raw, n: int, seed: int = 0):
    """``raw["train"]`` and then records of ``source``'s train pool that are in neither ``raw["train"]`` nor
    ``raw["validation"]`` (a seeded sample), ``n`` in all or as many as there are: prompts for self-distillation,
    whose responses the model writes itself."""
    from datasets import concatenate_datasets

    seen = set(raw["train"]["query"]) | set(raw["validation"]["query"])
    full = load_metamathqa(source, seed=seed)
    pool = concatenate_datasets([full["train"], full["validation"]])
    pool = pool.filter(lambda r: r["query"] not in seen).shuffle(seed=seed)
    extra = pool.select(range(min(len(pool), n - len(raw["train"]))))
    return concatenate_datasets([raw["train"], extra.select_columns(raw["train"].column_names)])


# --- prepared data on disk (what 00_data writes and later notebooks read) ------------------------------------------

def prepare(run_dir: str | Path, source: str = "synthetic", max_examples: int | None = 2000, seed: int = 0,
            tokenizer_name: str | None = None, vocab_size: int = 4096, max_seq_len: int = 256,
            val_fraction: float = 0.1, test_examples: int | None = None, first_examples: bool = False,
            prompt_format: str = "alpaca") -> dict:
    """Load the data, build the tokenizer, tokenize (prompts in ``prompt_format``), and save all three under
    ``run_dir/data`` (the format beside the tokenizer, ``prompt_format.txt``)."""
    out = Path(run_dir) / "data"
    ds = load_metamathqa(source, max_examples=max_examples, seed=seed, val_fraction=val_fraction,
                         test_examples=test_examples, first_examples=first_examples)
    texts = (format_prompt(q) + r for q, r in zip(ds["train"]["query"], ds["train"]["response"]))
    tokenizer = build_tokenizer(texts, name=tokenizer_name, vocab_size=vocab_size, save_dir=out / "tokenizer")
    set_prompt_format(tokenizer, prompt_format)
    (out / "tokenizer" / "prompt_format.txt").write_text(prompt_format + "\n")
    tokenized = tokenize_dataset(ds, tokenizer, max_seq_len)
    ds.save_to_disk(str(out / "raw"))
    tokenized.save_to_disk(str(out / "tokenized"))
    note_written(out)
    return {"raw": ds, "tokenized": tokenized, "tokenizer": tokenizer}


def load_prepared(run_dir: str | Path) -> dict:
    """What :func:`prepare` saved; a clear error if 00_data has not run for this profile."""
    from datasets import load_from_disk

    out = Path(run_dir) / "data"
    for sub in ("raw", "tokenized", "tokenizer"):
        if not (out / sub).exists():
            raise FileNotFoundError(f"{out / sub} is missing: run notebooks/00_data.ipynb for this profile first")
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    fmt = out / "tokenizer" / "prompt_format.txt"
    set_prompt_format(tok, fmt.read_text().strip() if fmt.exists() else "alpaca")
    return {"raw": load_from_disk(str(out / "raw")), "tokenized": load_from_disk(str(out / "tokenized")),
            "tokenizer": tok}
