import json
import re
from fractions import Fraction

import pytest
from datasets import Dataset

from multitoken import data as D
from multitoken.synthetic import FAMILIES, TYPES, generate_records

EQ = re.compile(r"(\d+(?:\.\d+)?(?:\s*[-+*/]\s*\d+(?:\.\d+)?)+)\s*=\s*(-?\d+(?:\.\d+)?)")


def test_every_stated_equation_and_answer_is_right(records):
    for r in records:
        text = r["response"].replace("$", "")
        eqs = EQ.findall(text)
        assert eqs, r["response"]
        for lhs, rhs in eqs:
            assert Fraction(eval(lhs)).limit_denominator(1000) == Fraction(rhs), (lhs, rhs, r["response"])
        final = re.search(r"The answer is: (-?[\d.]+)$", r["response"]).group(1)
        if r["type"] in ("GSM_SV", "GSM_FOBAR"):
            # x is the number that was replaced in the original question
            assert re.search(rf"(?<![\d.]){re.escape(final)}(?![\d])", r["original_question"]), r
            assert "x" in r["query"]
        else:
            # the final step's result is the answer
            assert Fraction(eqs[-1][1]) == Fraction(final)


def test_generator_is_deterministic_and_covers_families_and_types(records):
    assert generate_records(50, seed=7) == generate_records(50, seed=7)
    assert generate_records(50, seed=7) != generate_records(50, seed=8)
    assert {r["type"] for r in records} == set(TYPES)
    assert len({r["family"] for r in records}) == len(FAMILIES) >= 8


def test_load_metamathqa_splits_and_jsonl(tmp_path, records):
    ds = D.load_metamathqa("synthetic", max_examples=100, seed=0, val_fraction=0.2)
    assert (len(ds["train"]), len(ds["validation"])) == (80, 20)
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"query": r["query"], "response": r["response"]}) for r in records[:30]))
    ds = D.load_metamathqa(str(p), val_fraction=0.1)
    assert len(ds["train"]) + len(ds["validation"]) == 30
    j = tmp_path / "mine.json"
    j.write_text(json.dumps(records[:10]))
    assert len(D.read_records(j)) == 10


@pytest.mark.parametrize("content,match", [
    ('{"query": "a", "response": "b"}\n{not json}\n', "line 2 is not valid JSON"),
    ('{"query": "a", "response": "b"}\n{"query": "c"}\n', r"line 2 lacks field\(s\) \['response'\]"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        D.load_metamathqa(str(p))


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.load_metamathqa(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "empty.jsonl"
    p.write_text('{"query": " ", "response": "x"}\n')
    with pytest.raises(ValueError, match="usable records"):
        D.load_metamathqa(str(p))


def test_tokenizer_round_trip_pad_eos_and_label_mask(tmp_path, records):
    texts = [D.format_prompt(r["query"]) + r["response"] for r in records]
    tok = D.build_tokenizer(texts, vocab_size=400, save_dir=tmp_path / "tok")
    assert tok.pad_token_id != tok.eos_token_id
    for t in texts[:50]:
        assert tok.decode(tok(t)["input_ids"]) == t
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
    ds = D.tokenize_dataset(Dataset.from_list(records[:20]), tok, max_seq_len=10_000)
    for r, ex in zip(records[:20], ds):
        n_prompt = len(tok(D.format_prompt(r["query"]))["input_ids"])
        assert ex["prompt_len"] == n_prompt
        assert all(l == -100 for l in ex["labels"][:n_prompt])
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert ex["input_ids"][-1] == tok.eos_token_id
    lens = [len(tok(D.format_prompt(r["query"]))["input_ids"]) for r in records[:20]]
    cut = sorted(lens)[10] + 2
    short = D.tokenize_dataset(Dataset.from_list(records[:20]), tok, max_seq_len=cut)
    assert all(len(x) <= cut for x in short["input_ids"])
    assert len(short) == sum(n < cut for n in lens)  # prompt-only examples dropped, the rest truncated
    with pytest.raises(ValueError, match="raise max_seq_len"):
        D.tokenize_dataset(Dataset.from_list(records[:5]), tok, max_seq_len=8)
    batch = D.Collator(tok.pad_token_id)([ds[0], ds[1]])
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == tok.pad_token_id).all()


def test_preprocess_data_and_custom_loader(tmp_path, records):
    tr, va, tok = D.preprocess_data(model_name=None, max_seq_len=192, max_examples=60, source="synthetic",
                                    vocab_size=400, train_batch_size=4, n_positions=192)
    b = next(iter(tr))
    assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 192
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in records[:9]))
    loader = D.create_custom_dataloader(p, tok, max_seq_len=192, batch_size=4)
    assert sum(len(b["input_ids"]) for b in loader) == 9
    with pytest.raises(ValueError, match="above the model's context"):
        D.preprocess_data(model_name=None, max_seq_len=256, source="synthetic", max_examples=20, n_positions=128)


def test_pretrained_tokenizer_path_uses_a_local_directory(tmp_path, records):
    """The hub path (``from_pretrained("gpt2")``) is the same code as a local save_pretrained directory."""
    texts = [r["response"] for r in records]
    D.build_tokenizer(texts, vocab_size=300, save_dir=tmp_path / "gpt2-like")
    tok = D.build_tokenizer(name=str(tmp_path / "gpt2-like"))
    assert tok.pad_token_id != tok.eos_token_id


# --- GSM8K, shipped in data/gsm8k --------------------------------------------------------------------------------

def test_gsm8k_first_records_convert_to_the_exact_expected_strings():
    train, test = D.read_gsm8k(D.GSM8K_DIR / "train.jsonl"), D.read_gsm8k(D.GSM8K_DIR / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0] == {
        "query": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
                 "many clips did Natalia sell altogether in April and May?",
        "response": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
                    "\nThe answer is: 72",
        "type": "GSM_Original", "original_question": train[0]["query"]}
    assert train[1]["response"] == ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                                    "$10.\nThe answer is: 10")
    assert test[0]["response"].endswith("She makes 9 * 2 = $18 every day at the farmer’s market.\nThe answer is: 18")


def test_every_converted_final_answer_equals_the_gsm8k_value():
    from multitoken.evaluation import extract_answer

    for name in ("train.jsonl", "test.jsonl"):
        raw = [json.loads(line) for line in (D.GSM8K_DIR / name).read_text().splitlines()]
        conv = D.read_gsm8k(D.GSM8K_DIR / name)
        for r, c in zip(raw, conv, strict=True):
            want = Fraction(r["answer"].split("####")[-1].strip().replace(",", ""))
            assert Fraction(extract_answer(c["response"])) == want, (r["answer"], c["response"])
            assert "<<" not in c["response"] and "####" not in c["response"]


def test_gsm8k_source_keeps_the_official_test_split():
    ds = D.load_metamathqa("gsm8k", max_examples=1000, seed=1, val_fraction=0.1, test_examples=50)
    assert (len(ds["train"]), len(ds["validation"]), len(ds["test"])) == (900, 100, 50)
    assert ds["test"][0]["query"].startswith("Janet’s ducks lay 16 eggs")       # file order: the first test problem
    again = D.load_metamathqa("gsm8k", max_examples=1000, seed=1, val_fraction=0.1, test_examples=50)
    assert again["validation"]["query"] == ds["validation"]["query"]             # seeded carve-out
    assert not set(ds["validation"]["query"]) & set(ds["train"]["query"])


@pytest.mark.parametrize("line,match", [
    ('{not json}', "line 2 is not valid JSON"),
    ('{"question": "q"}', r"line 2 lacks field\(s\) \['answer'\]"),
    ('{"question": "q", "answer": "4 + 4 = 8"}', "line 2: answer has no final '#### <number>' line"),
    ('{"question": "q", "answer": "so\\n#### eight"}', "line 2: final answer 'eight' is not a number"),
])
def test_bad_gsm8k_lines_name_file_and_line(tmp_path, line, match):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "1 + 1 = 2\\n#### 2"}\n' + line + "\n")
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 2"}\n')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train.jsonl")) + ": " + match):
        D.load_metamathqa(f"gsm8k:{tmp_path}")


def test_missing_gsm8k_file_says_where_the_data_should_be(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.jsonl.*ships GSM8K under data/gsm8k"):
        D.load_metamathqa(f"gsm8k:{tmp_path}")


def test_more_prompts_extends_train_with_unseen_records_of_the_pool():
    """Self-distillation prompts beyond the train split come from the source's pool, never from validation (or
    twice): the heads' validation text stays unseen."""
    raw = D.load_metamathqa("gsm8k", max_examples=40, seed=3)
    more = D.more_prompts("gsm8k", raw, 100, seed=3)
    assert len(more) == 100 and more["query"][:36] == raw["train"]["query"]
    assert len(set(more["query"])) == 100 and not set(more["query"]) & set(raw["validation"]["query"])
    assert set(more.column_names) == set(raw["train"].column_names)
