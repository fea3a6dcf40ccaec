"""Training on Hugging Face ``Trainer``: NTP baseline, MTP, and MEDUSA-1, with the thesis' entry points.

Every run writes a CSV log (step, train loss, eval loss, elapsed seconds, tokens/s, and per-head loss / top-1
accuracy for multi-head models) atomically after each log event, and safetensors checkpoints under ``output_dir``.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed)

from .core.backbones import backbone_of
from .evaluation import peak_memory_mb
from .core.medusa import frequent_tokens, wrap_model_with_medusa
from .core.models import MTP_FIELD_NAMES, MTPConfig, MultiTokenGPT2, wrap_model_with_mtp
from .core.pretrained import load_model
from .utils import atomic_dir, write_csv

log = logging.getLogger(__name__)



class CSVLogCallback(TrainerCallback):
    """Appends one row per log event to a CSV (rewritten atomically each time)."""

    def __init__(self, path):
        self.path, self.rows = Path(path), []
        self.t0 = self.last_t = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        if args.device.type == "cuda":  # peak_mem_mb is this run's peak
            torch.cuda.reset_peak_memory_stats(args.device)
        self.t0 = self.last_t = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen
        if state.global_step and self.path.exists():  # resumed: keep the earlier rows
            import pandas as pd

            self.rows = pd.read_csv(self.path).to_dict("records")

    def on_log(self, args, state, control, logs=None, **kw):
        logs, now = logs or {}, time.perf_counter()
        elapsed = now - (self.t0 or now)
        dt, dtok = now - (self.last_t or now), state.num_input_tokens_seen - self.last_tokens
        row = {"step": state.global_step, "epoch": state.epoch, "train_loss": logs.get("loss"),
               "eval_loss": logs.get("eval_loss"), "elapsed_s": round(elapsed, 3),
               "tokens_per_s": round(dtok / dt, 1) if "loss" in logs and dt > 0 else None,
               "peak_mem_mb": round(peak_memory_mb(args.device), 1)}  # CUDA max allocated, or peak RSS
        row.update({k: v for k, v in logs.items() if k.startswith(("head", "eval_head"))})
        if "loss" in logs:
            self.last_t, self.last_tokens = now, state.num_input_tokens_seen
        if "loss" in logs or "eval_loss" in logs:
            self.rows.append(row)
            write_csv(self.path, self.rows)


class WarmupCallback(TrainerCallback):
    """Feeds the optimizer step to the model so the auxiliary-loss weights warm up."""

    def on_step_begin(self, args, state, control, model=None, **kw):
        if hasattr(model, "set_training_step"):
            model.set_training_step(state.global_step)


class HeadsFirstCallback(TrainerCallback):
    """For the first ``steps`` optimizer steps only the heads train (the backbone stops requiring grad), then all."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_begin(self, args, state, control, model=None, **kw):
        frozen = state.global_step < self.steps
        for name, p in model.named_parameters():
            if not model.is_head_parameter(name) and p.requires_grad == frozen:
                p.requires_grad_(not frozen)


class MultiHeadTrainer(Trainer):
    """Trainer that logs per-head loss and top-1 accuracy (index 0 = next token, k = token t+k+1). With
    ``trunk_lr_scale`` the backbone's learning rate is the heads' times that factor (the schedule scales both)."""

    def __init__(self, *args, trunk_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: let Trainer scale for accumulation
        self._acc = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.trunk_lr_scale = trunk_lr_scale

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if self.trunk_lr_scale == 1.0:
            return opt
        m = self.model if model is None else model
        heads = {id(p) for n, p in m.named_parameters() if m.is_head_parameter(n)}
        groups = [{**g, "params": ps, "lr": g["lr"] * (1.0 if head else self.trunk_lr_scale)}
                  for g in opt.param_groups for head in (True, False)
                  if (ps := [p for p in g["params"] if (id(p) in heads) == head])]
        opt.param_groups.clear()
        for g in groups:
            opt.add_param_group(g)
        return opt

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        split = "train" if model.training else "eval"
        if getattr(outputs, "step_losses", None) is not None:
            for k, (l, a) in enumerate(zip(outputs.step_losses.tolist(), outputs.step_accuracy.tolist())):
                self._acc[split][f"head{k}_loss"].append(l)
                self._acc[split][f"head{k}_acc"].append(a)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, *args, **kwargs):
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for k, v in self._acc[split].items():
            if v:
                logs[prefix + k] = round(sum(v) / len(v), 4)
        self._acc[split].clear()
        super().log(logs, *args, **kwargs)


def training_args(output_dir, num_train_epochs=1.0, learning_rate=5e-5, batch_size=4, gradient_accumulation_steps=1,
                  eval_steps=50, logging_steps=10, warmup_steps=0, max_steps=-1, seed=0, save_steps=None,
                  gradient_checkpointing=False, weight_decay=0.0, device=None, cpu_bf16=False,
                  train_sampling_strategy="group_by_length", save_strategy="steps", **extra) -> TrainingArguments:
    """TrainingArguments for this workbook. On CUDA (``device`` None = CUDA when present): bf16 autocast where the
    GPU has it, else fp16; on the CPU, fp32, or bf16 autocast with ``cpu_bf16`` (AVX-512 BF16 / AMX CPUs: a
    SmolLM2 fine-tuning step ran 250 tokens/s against 150 in fp32 here). Activation checkpointing only when asked
    for (GPT-2 124M at the thesis' batch fits an H100 without it, and it only adds a recomputation)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    bf16 = (cuda and torch.cuda.is_bf16_supported()) or (not cuda and cpu_bf16)
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=num_train_epochs, max_steps=max_steps,
        learning_rate=learning_rate, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, warmup_steps=warmup_steps,
        lr_scheduler_type="cosine", weight_decay=weight_decay, eval_strategy="steps", eval_steps=eval_steps,
        logging_steps=logging_steps, save_strategy=save_strategy, save_steps=save_steps or eval_steps, save_total_limit=2,
        report_to="none", seed=seed, bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda,
        activation_checkpointing=gradient_checkpointing,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, dataloader_num_workers=0,
        # default: batches of similar lengths (GSM8K's examples run 60-500 tokens; padding to the longest wasted ~40%)
        train_sampling_strategy=train_sampling_strategy, **extra)


def _fit(model, train_dataloader, val_dataloader, tokenizer, output_dir, log_csv, resume_from_checkpoint, trainer_cls,
         args_kw, trunk_lr_scale=1.0, heads_first_steps=0):
    output_dir = Path(output_dir)
    args = training_args(output_dir, batch_size=train_dataloader.batch_size,
                         **{k: v for k, v in args_kw.items() if v is not None})
    callbacks = [WarmupCallback()] + ([CSVLogCallback(log_csv)] if log_csv else []) + (
        [HeadsFirstCallback(heads_first_steps)] if heads_first_steps else [])
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataloader.dataset,
                          eval_dataset=val_dataloader.dataset, data_collator=train_dataloader.collate_fn,
                          processing_class=tokenizer, callbacks=callbacks,
                          **({"trunk_lr_scale": trunk_lr_scale} if trunk_lr_scale != 1.0 else {}))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    # Trainer turns the KV cache off for training (args.use_cache=False); a saved model should generate with it.
    model.config.use_cache = model.generation_config.use_cache = True
    # safetensors + config (+ tokenizer via processing_class), written beside and renamed into place
    atomic_dir(output_dir / "final", lambda tmp: trainer.save_model(str(tmp)))
    return trainer


def fit_model(model, train_dataloader, val_dataloader, tokenizer, output_dir, log_csv=None, **args_kw):
    """Train an already built model (e.g. ``thesis.from_gpt2``) with the workbook's Trainer, logs and checkpoints."""
    return _fit(model, train_dataloader, val_dataloader, tokenizer, output_dir, log_csv, None, MultiHeadTrainer,
                args_kw)


def _fresh_config(tokenizer, model_config: dict | None, cls=GPT2Config, **fields):
    """A fresh GPT-2 config; ``model_config["vocab_size"]`` may pad the vocabulary beyond the tokenizer's (the
    ``gpu`` profile pads to GPT-2's 50,257 so the logits cost what the thesis' did)."""
    cfg = dict(n_layer=4, n_embd=256, n_head=4, n_positions=512)
    cfg.update(model_config or {})
    cfg["vocab_size"] = max(len(tokenizer), cfg.get("vocab_size") or 0)
    return cls(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, **cfg, **fields)


def _sync_vocab(model, tokenizer):
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _base(model_name):
    """A pretrained causal LM: a model object, or a name :func:`multitoken.pretrained.load_model` resolves (a
    registry name such as ``smollm2-135m-instruct``, a local directory, a hub name)."""
    if isinstance(model_name, torch.nn.Module):
        return model_name
    return load_model(str(model_name))


def train_standard_gpt2(train_dataloader, val_dataloader, tokenizer, output_dir, num_train_epochs=1,
                        learning_rate=5e-5, gradient_accumulation_steps=1, model_name=None, model_config=None,
                        log_csv=None, resume_from_checkpoint=None, **args_kw):
    """Next-token-prediction baseline (the thesis' name; any family). ``model_name``: a pretrained model (registry
    name, local directory, hub name); ``None`` builds a fresh GPT-2 from ``model_config`` (n_layer, n_embd, n_head,
    n_positions)."""
    if model_name:
        model = _base(model_name)
    else:
        set_seed(args_kw.get("seed", 0))  # new weights: seeded here, not by whatever ran before in this process
        model = GPT2LMHeadModel(_fresh_config(tokenizer, model_config))
    _sync_vocab(model, tokenizer)
    trainer = _fit(model, train_dataloader, val_dataloader, tokenizer, output_dir, log_csv, resume_from_checkpoint,
                   MultiHeadTrainer, dict(num_train_epochs=num_train_epochs, learning_rate=learning_rate,
                                          gradient_accumulation_steps=gradient_accumulation_steps, **args_kw))
    return trainer.model, trainer


MTP_FIELDS = tuple(f for f in MTP_FIELD_NAMES if f not in ("num_predict_tokens", "layout", "thesis_padding_only_mask"))


def draft_vocab_of(tokenizer, loader, k: int, who: str):
    """The draft vocabulary of heads trained on ``loader``: its targets' ``k`` most frequent tokens and EOS (None
    for ``k`` = 0: the whole vocabulary)."""
    if not k:
        return None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = frequent_tokens((b["labels"] for b in loader), k, always=eos)
    log.info("%s draft vocabulary: %d tokens (asked %d)", who, len(ids), k)
    return ids


def build_mtp_model(tokenizer, num_tokens_to_predict=4, base_model=None, model_config=None, train_dataloader=None,
                    draft_vocab=0, **mtp):
    """An MTP model: a fresh GPT-2 (``model_config``), or heads on a pretrained model of any family (a model object or
    a name), its heads initialised from the trunk (``wrap_model_with_mtp``); with ``draft_vocab`` K > 0 (and a
    pretrained model) the heads predict over the K tokens most frequent in ``train_dataloader``'s targets (and EOS),
    those rows of the shared LM head."""
    fields = {k: v for k, v in mtp.items() if k in MTP_FIELDS and v is not None}
    if base_model is None:
        if draft_vocab:
            raise ValueError("draft_vocab needs a base_model (a draft vocabulary is rows of a trained LM head)")
        model = MultiTokenGPT2(_fresh_config(tokenizer, model_config, MTPConfig,
                                             num_predict_tokens=num_tokens_to_predict, **fields))
    else:
        if draft_vocab and train_dataloader is None:
            raise ValueError("draft_vocab needs the train_dataloader whose targets choose it")
        model = wrap_model_with_mtp(_base(base_model), num_predict_tokens=num_tokens_to_predict,
                                    draft_vocab=draft_vocab_of(tokenizer, train_dataloader, draft_vocab, "MTP"),
                                    **fields)
    return _sync_vocab(model, tokenizer)


def train_multi_token_gpt2(train_dataloader, val_dataloader, tokenizer, output_dir, num_tokens_to_predict=4,
                           num_train_epochs=1, learning_rate=5e-5, gradient_accumulation_steps=8, base_model=None,
                           model_config=None, log_csv=None, resume_from_checkpoint=None, mtp=None,
                           freeze_backbone=False, trunk_lr_scale=1.0, heads_first_steps=0, draft_vocab=0, **args_kw):
    """MTP training: ``mtp`` holds the head design (head_type, sequential, weighting, warm-up, ...).
    ``freeze_backbone`` (with a ``base_model``) trains the heads only, on a frozen pretrained model, as MEDUSA-1;
    ``heads_first_steps`` trains the heads alone for that many optimizer steps, then everything;
    ``trunk_lr_scale`` gives the backbone that fraction of the heads' learning rate; ``draft_vocab`` K > 0: the heads
    predict over the K tokens most frequent in the training targets (and EOS)."""
    set_seed(args_kw.get("seed", 0))
    model = build_mtp_model(tokenizer, num_tokens_to_predict, base_model, model_config, train_dataloader,
                            draft_vocab, **(mtp or {}))
    if freeze_backbone:
        if base_model is None:
            raise ValueError("freeze_backbone needs a base_model: a fresh backbone frozen at random would never learn")
        model.freeze_backbone()
        args_kw["gradient_checkpointing"] = False  # nothing to recompute for a frozen backbone
    trainer = _fit(model, train_dataloader, val_dataloader, tokenizer, output_dir, log_csv, resume_from_checkpoint,
                   MultiHeadTrainer, dict(num_train_epochs=num_train_epochs, learning_rate=learning_rate,
                                          gradient_accumulation_steps=gradient_accumulation_steps, **args_kw),
                   trunk_lr_scale=trunk_lr_scale, heads_first_steps=heads_first_steps)
    return trainer.model, trainer


def train_medusa(base_model, train_dataloader, val_dataloader, tokenizer, output_dir, num_medusa_heads=5,
                 medusa_num_layers=1, freeze_backbone=True, num_train_epochs=1, learning_rate=1e-3,
                 gradient_accumulation_steps=1, log_csv=None, resume_from_checkpoint=None, draft_vocab=0, **args_kw):
    """MEDUSA-1: heads on a frozen base of any family (a model, a registry name, a local directory, a hub name).
    ``draft_vocab`` K > 0: the heads predict over the K tokens most frequent in the training targets (and EOS)."""
    set_seed(args_kw.get("seed", 0))
    model = build_medusa(base_model, tokenizer, train_dataloader, num_medusa_heads, medusa_num_layers, draft_vocab)
    if freeze_backbone:
        model.freeze_backbone()
        # a frozen backbone needs no backward: checkpointing it would only re-run its forward
        args_kw["gradient_checkpointing"] = False
    trainer = _fit(model, train_dataloader, val_dataloader, tokenizer, output_dir, log_csv, resume_from_checkpoint,
                   MultiHeadTrainer, dict(num_train_epochs=num_train_epochs, learning_rate=learning_rate,
                                          gradient_accumulation_steps=gradient_accumulation_steps, **args_kw))
    return trainer.model, trainer


def build_medusa(base_model, tokenizer, train_dataloader, num_medusa_heads=5, medusa_num_layers=1, draft_vocab=0):
    """Untrained MEDUSA-1 heads on ``base_model`` (not frozen here); with ``draft_vocab`` K > 0 their vocabulary is
    the K tokens most frequent in ``train_dataloader``'s targets (and EOS)."""
    ids = draft_vocab_of(tokenizer, train_dataloader, draft_vocab, "MEDUSA-1")
    model = wrap_model_with_medusa(_base(base_model), num_medusa_heads, medusa_num_layers, freeze=False,
                                   draft_vocab=ids)
    return _sync_vocab(model, tokenizer)


def self_distill(model, tokenizer, dataset, max_new_tokens=256, batch_size=16, engine="hf"):
    """Medusa's self-distillation: replace each ``response`` by the frozen base model's greedy continuation
    (batched, on the model's device; ``engine``: HF ``generate`` or this workbook's batched loop, ``"speculative"``,
    whose rows are each what they would be alone). Records whose prompt leaves no room in the context are dropped,
    with a count in the log."""
    if engine not in ("hf", "speculative"):
        raise ValueError(f"engine must be 'hf' or 'speculative', got {engine!r}")
    from tqdm.auto import tqdm

    from .data import format_prompt

    model.eval()
    n_pos, dev = backbone_of(model).context_size, next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer([format_prompt(q, tokenizer) for q in dataset["query"]],
                                               add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n < n_pos]
    if len(keep) < len(dataset):
        log.warning("self-distillation: skipped %d of %d records whose prompt has no room in the context (%d tokens)",
                    len(dataset) - len(keep), len(dataset), n_pos)
        dataset = dataset.select(keep)
    if len(dataset) == 0:
        raise ValueError(f"self-distillation: every prompt is longer than the context ({n_pos} tokens)")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    responses = []
    try:
        for i in tqdm(range(0, len(dataset), batch_size), desc="self-distill"):
            prompts = [format_prompt(q, tokenizer) for q in dataset[i: i + batch_size]["query"]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            room = n_pos - enc.input_ids.shape[1]
            kw = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            with torch.no_grad():
                if engine == "hf":
                    out = model.generate(**enc, max_new_tokens=max(1, min(max_new_tokens, room)), do_sample=False,
                                         **kw)
                else:
                    from .decoding import speculative_generate

                    out = speculative_generate(model, enc.input_ids, max(1, min(max_new_tokens, room)),
                                               attention_mask=enc.attention_mask, tree="none", **kw)[0]
            responses += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return dataset.map(lambda r, idx: {"response": responses[idx].strip() or r["response"]}, with_indices=True)


# --- heads on cached features ----------------------------------------------------------------------------------------
FEATURE_KEYS = ("input_ids", "labels", "h0", "lm_nll", "lm_hit")


def head1_targets(labels) -> int:
    """An example's head-1 targets: positions whose token two ahead is a label (``labels``: a list or a tensor)."""
    return int((torch.as_tensor(labels[2:]) != -100).sum())


def leading_examples(labels_per_example, n_tokens: int) -> int:
    """How many leading examples hold at least ``n_tokens`` head-1 targets (all of them when fewer)."""
    seen = e = 0
    for labels in labels_per_example:
        if seen >= n_tokens:
            break
        seen, e = seen + head1_targets(labels), e + 1
    return e


class FeatureSet(torch.utils.data.Dataset):
    """Per example: its tokens, labels, the states its heads read (``h0``, stored in bf16) and the frozen model's
    next-token loss and hit at each position (the log's head 0, a constant). Flat tensors with ``offsets``, so one
    safetensors file holds a split (:func:`cache_head_features`)."""

    def __init__(self, flat: dict):
        missing = [k for k in (*FEATURE_KEYS, "offsets") if k not in flat]
        if missing:
            raise ValueError(f"a feature set needs {FEATURE_KEYS + ('offsets',)}; missing {missing}")
        self.flat = flat

    def __len__(self):
        return len(self.flat["offsets"]) - 1

    def __getitem__(self, i):
        a, b = self.flat["offsets"][i].item(), self.flat["offsets"][i + 1].item()
        return {k: self.flat[k][a:b] for k in FEATURE_KEYS}

    def _labels(self):
        lab, off = self.flat["labels"], self.flat["offsets"].tolist()
        return (lab[a:b] for a, b in zip(off, off[1:]))

    def first(self, n_tokens: int) -> "FeatureSet":
        """The leading examples that hold at least ``n_tokens`` head-1 targets (all of them when fewer)."""
        e = leading_examples(self._labels(), n_tokens)
        end = self.flat["offsets"][e].item()
        return FeatureSet({**{k: self.flat[k][:end] for k in FEATURE_KEYS}, "offsets": self.flat["offsets"][: e + 1]})

    @property
    def num_tokens(self) -> int:
        """Head-1 targets (:func:`head1_targets`) of every example."""
        return sum(head1_targets(lab) for lab in self._labels())

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.flat.items()}, str(path))

    @classmethod
    def load(cls, path) -> "FeatureSet":
        from safetensors.torch import load_file

        return cls(load_file(str(path)))

    def collate(self, rows):
        """Right-padded batch: pad ids 0 (masked), labels -100, states and next-token numbers 0."""
        T = max(len(r["input_ids"]) for r in rows)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, T - len(t)), value=v)  # noqa: E731
        out = {k: torch.stack([pad(r[k], -100 if k == "labels" else 0) for r in rows]) for k in FEATURE_KEYS}
        out["attention_mask"] = torch.stack([pad(torch.ones(len(r["input_ids"]), dtype=torch.long), 0) for r in rows])
        return out


@torch.no_grad()
def cache_head_features(model, loader, dtype=torch.bfloat16, desc="features") -> FeatureSet:
    """One pass of ``model``'s frozen backbone over ``loader``'s right-padded batches (on the model's device):
    every example's tokens, labels and ``model.head_inputs`` (in ``dtype``), and the next-token NLL and hit at each
    position whose next token is a label (0 elsewhere)."""
    from tqdm.auto import tqdm

    model.eval()
    dev = next(model.parameters()).device
    cols, offsets = {k: [] for k in FEATURE_KEYS}, [0]
    for batch in tqdm(loader, desc=desc, leave=False):
        ids, lab = batch["input_ids"].to(dev), batch["labels"].to(dev)
        att = batch["attention_mask"].to(dev)
        h0, hidden = model.head_inputs(ids, att)
        tg = torch.nn.functional.pad(lab[:, 1:], (0, 1), value=-100)               # position t predicts t+1
        keep = tg != -100
        nll, hit = torch.zeros(tg.shape, device=dev), torch.zeros(tg.shape, dtype=torch.bool, device=dev)
        if keep.any():
            logits = model.lm_head(hidden[keep]).float()
            nll[keep] = torch.nn.functional.cross_entropy(logits, tg[keep], reduction="none")
            hit[keep] = logits.argmax(-1) == tg[keep]
        for r in range(len(ids)):
            n = int(att[r].sum())
            for k, t in zip(FEATURE_KEYS, (ids, lab, h0.to(dtype), nll, hit)):
                cols[k].append(t[r, :n].cpu())
            offsets.append(offsets[-1] + n)
    return FeatureSet({**{k: torch.cat(v) for k, v in cols.items()}, "offsets": torch.tensor(offsets)})


class HeadsOnFeatures(torch.nn.Module):
    """What the Trainer trains when the backbone is frozen: ``model``'s heads on cached features, its loss and
    per-head log as the model's own forward gives them (head 0: the frozen model's next-token numbers)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def set_training_step(self, step: int):
        if hasattr(self.model, "set_training_step"):
            self.model.set_training_step(step)

    def forward(self, input_ids, labels, h0, lm_nll, lm_hit, attention_mask=None, **_):
        from .core.heads import MultiTokenOutput

        dtype = next(self.model.parameters()).dtype
        loss, hl, ha = self.model.heads_loss(h0.to(dtype), input_ids, labels, self.model.head_loss_weights())
        scored = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))
        n = scored.sum().clamp(min=1)
        lm = torch.stack([(lm_nll * scored).sum() / n, (lm_hit & scored).sum() / n]).float().cpu()
        return MultiTokenOutput(loss=loss, step_losses=torch.cat([lm[:1], hl.cpu()]),
                                step_accuracy=torch.cat([lm[1:], ha.cpu()]))


def train_heads_on_features(model, train: FeatureSet, val: FeatureSet, tokenizer, output_dir, log_csv=None,
                            batch_size=8, save=True, **args_kw):
    """Train ``model``'s heads (its backbone frozen: no trunk parameter may require grad) on cached features with
    the workbook's Trainer and CSV log, then (``save``) save the whole model to ``output_dir/final`` like the other
    variants. Each epoch costs the heads' forward and backward only, not the backbone's forward."""
    trunk = [n for n, p in model.named_parameters() if p.requires_grad and not model.is_head_parameter(n)]
    if trunk:
        raise ValueError(f"cached features need a frozen backbone, but {len(trunk)} of its parameters train "
                         f"({', '.join(trunk[:3])}{', ...' if len(trunk) > 3 else ''}): call model.freeze_backbone() first")
    set_seed(args_kw.get("seed", 0))
    output_dir = Path(output_dir)
    args_kw.setdefault("train_sampling_strategy", "random")  # the lengths of a feature set are not a dataset column
    args_kw.setdefault("save_strategy", "no")                 # epochs are cheap: the final model is what is kept
    args = training_args(output_dir, batch_size=batch_size, **{k: v for k, v in args_kw.items() if v is not None})
    callbacks = [WarmupCallback()] + ([CSVLogCallback(log_csv)] if log_csv else [])
    trainer = MultiHeadTrainer(model=HeadsOnFeatures(model), args=args, train_dataset=train, eval_dataset=val,
                               data_collator=train.collate, callbacks=callbacks)
    trainer.train()
    model.config.use_cache = model.generation_config.use_cache = True
    if save:
        atomic_dir(output_dir / "final", lambda tmp: (model.save_pretrained(str(tmp)),
                                                      tokenizer.save_pretrained(str(tmp))))
    return model.eval(), trainer


def _hits(model, logits, lab) -> torch.Tensor:
    """Per position whose head-1 target is a label, whether head k's top-1 is the token at t+k+1."""
    T_ = lab.shape[1]
    at = torch.nn.functional.pad(lab[:, 2:] != -100, (0, 2))                  # head 1 has a target at t
    hits = []
    for k, lg in enumerate(logits, 1):
        tgt = torch.nn.functional.pad(lab[:, k + 1:], (0, k + 1), value=-100)[:, :T_]
        hits.append((model.head_token_ids(lg.argmax(-1)) == tgt) & (tgt != -100))
    return torch.stack(hits, -1)[at].cpu()


@torch.no_grad()
def head_hits(model, feats: FeatureSet, batch_size: int = 16) -> torch.Tensor:
    """``(positions, S)`` bool: whether head k's top-1 at position t is the token at t+k+1 (teacher-forced on the
    cached states), at every position whose head-1 target is a label; a target past the text is a miss."""
    model.eval()
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = []
    for i in range(0, len(feats), batch_size):
        b = feats.collate([feats[j] for j in range(i, min(i + batch_size, len(feats)))])
        ids, lab = b["input_ids"].to(dev), b["labels"].to(dev)
        out.append(_hits(model, model.all_head_logits(b["h0"].to(dev, dtype), ids), lab))
    return torch.cat(out)


@torch.no_grad()
def loader_head_hits(model, loader, max_batches: int | None = None) -> torch.Tensor:
    """:func:`head_hits` for any model with heads (jointly trained ones too) over a loader's batches (the first
    ``max_batches``), teacher-forced on the loader's text through the model's own forward."""
    model.eval()
    dev, out = next(model.parameters()).device, []
    for i, b in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids, mask, lab = (b[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
        res = model(input_ids=ids, attention_mask=mask, output_head_logits=True)
        out.append(_hits(model, res.head_logits, lab))
    return torch.cat(out)


def acceptance(hits: torch.Tensor) -> dict:
    """From :func:`head_hits`: each head's top-1 accuracy, the first draft's acceptance (head 1's), and the chain's
    mean accepted length per step, τ = 1 + the mean run of leading hits (on the model's own greedy text a chain of
    the S heads at t accepts exactly that run; averaged over every position, where decoding visits only the
    positions it lands on)."""
    run = hits.long().cumprod(-1).sum(-1).float()
    return {"per_head_top1": hits.float().mean(0).tolist(), "first_token": float(hits[:, 0].float().mean()),
            "tau": 1.0 + float(run.mean()), "positions": int(len(hits))}
