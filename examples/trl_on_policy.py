"""On-policy distillation with TRL on fastkd, on a CPU, in about a minute.

1. Text: the docstrings of a few standard-library modules (nothing is downloaded), lower-cased, as
   characters; a character-level tokenizer built with ``tokenizers``.
2. Teacher: a small Llama-architecture model trained on that text with plain cross-entropy.
3. Student: a smaller one, distilled on-policy by
   ``fastkd.integrations.trl.FastKDDistillationTrainer`` — TRL's ``DistillationTrainer`` (the student
   samples a completion of each prompt, the loss compares its next-token distributions with the
   teacher's on those tokens) with fastkd's fused linear loss as the loss engine.
4. Held-out report: the student's cross-entropy on text it never saw and its forward KL from the
   teacher, before and after, next to the teacher's own cross-entropy; a few sampled completions.

    python examples/trl_on_policy.py                 # about a minute on 2 CPU cores
    python examples/trl_on_policy.py --help
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODULES = ("json", "textwrap", "string", "collections", "functools", "itertools", "argparse", "pathlib",
           "random", "statistics", "heapq", "bisect", "shutil", "tempfile", "csv", "fractions", "decimal",
           "difflib", "inspect", "logging", "typing", "dataclasses", "contextlib", "enum", "calendar")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:'\"()-\n"


def corpus_text() -> str:
    """The docstrings of MODULES and of their public members, lower-cased, reduced to CHARS."""
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when looked up
            warnings.simplefilter("ignore", DeprecationWarning)
            members = [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
            docs = [(obj, getattr(obj, "__doc__", None)) for obj in [mod] + members]
        for obj, doc in docs:
            if isinstance(doc, str) and len(doc) > 40 and (obj is mod or getattr(obj, "__module__", None) == name):
                parts.append(doc)
    text = "\n".join(dict.fromkeys(parts)).lower()
    return "".join(c if c in CHARS else " " for c in text)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab, []))  # no merges: one token per character
    tok.decoder = decoders.Fuse()  # decoding joins the characters without separators
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def build_model(vocab: int, hidden: int, layers: int, seed: int, context: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def blocks(ids, length, n, gen):
    import torch

    starts = torch.randint(0, len(ids) - length - 1, (n,), generator=gen)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def train_teacher(teacher, ids, args, progress):
    """Plain next-token cross-entropy on random blocks of the training text (AdamW)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.teacher_lr, weight_decay=0.0)
    teacher.train()
    bar = progress(range(args.teacher_steps), desc="teacher (CE)", disable=args.quiet)
    for _ in bar:
        x = blocks(ids, args.block, args.batch, gen)
        loss = teacher(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    teacher.eval()


def heldout(student, teacher, x):
    """(student CE, teacher CE, forward KL(teacher ‖ student)) per token on the held-out blocks ``x``."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        zs = student(input_ids=x).logits[:, :-1].float()
        zt = teacher(input_ids=x).logits[:, :-1].float()
    y = x[:, 1:]
    ce_s = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), y.reshape(-1)).item()
    ce_t = F.cross_entropy(zt.reshape(-1, zt.shape[-1]), y.reshape(-1)).item()
    lt, ls = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    return ce_s, ce_t, kl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-steps", type=int, default=300, help="CE steps of the teacher")
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=60, help="on-policy distillation steps of the student")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--block", type=int, default=64, help="characters per teacher training sequence")
    ap.add_argument("--prompt-len", type=int, default=24, help="characters per prompt")
    ap.add_argument("--completion-len", type=int, default=24, help="tokens the student samples per prompt")
    ap.add_argument("--beta", type=float, default=0.5, help="TRL's beta: 0 forward KL, 0.5 JSD, 1 reverse KL")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling and loss temperature (TRL's)")
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--student-hidden", type=int, default=48)
    ap.add_argument("--student-layers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    import transformers
    from tqdm.auto import tqdm

    from fastkd.integrations.trl import FastKDDistillationTrainer
    from trl import DistillationConfig

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    text = corpus_text()
    tok = build_tokenizer()
    ids = torch.tensor(tok(text)["input_ids"])
    split = int(0.9 * len(ids))
    train_ids, test_ids = ids[:split], ids[split:]
    context = max(args.block, args.prompt_len + args.completion_len) + 1
    vocab = len(tok)
    print(f"text: {len(ids)} characters of standard-library docstrings ({split} train, {len(ids) - split} "
          f"held out), vocabulary {vocab}")

    teacher = build_model(vocab, args.teacher_hidden, args.teacher_layers, args.seed, context)
    student = build_model(vocab, args.student_hidden, args.student_layers, args.seed + 1, context)
    print(f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e3:.0f}k parameters, "
          f"student {sum(p.numel() for p in student.parameters()) / 1e3:.0f}k")
    train_teacher(teacher, train_ids, args, tqdm)
    test_x = blocks(test_ids, args.block, 64, torch.Generator().manual_seed(args.seed + 2))
    before = heldout(student, teacher, test_x)

    rng = random.Random(args.seed)
    words = [i for i in range(split - args.prompt_len) if text[i] == " "]  # prompts start at a word
    prompts = [text[s + 1:s + 1 + args.prompt_len] for s in rng.sample(words, min(len(words), 4096))]
    scratch = tempfile.TemporaryDirectory()
    config = DistillationConfig(
        output_dir=scratch.name,  # nothing is saved (save_strategy="no")
        per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_completion_length=args.completion_len, beta=args.beta,
        temperature=args.temperature, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=max(1, args.steps // 6), seed=args.seed, disable_tqdm=args.quiet,
        dataloader_num_workers=0)
    trainer = FastKDDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                                        processing_class=tok)
    t1 = time.perf_counter()
    trainer.train()
    distil_s = time.perf_counter() - t1
    scratch.cleanup()
    student.eval()
    after = heldout(student, teacher, test_x)
    logs = [h for h in trainer.state.log_history if "loss" in h]

    print(f"\n{'held-out, per character':<28} {'student before':>15} {'student after':>14} {'teacher':>8}")
    print(f"{'cross-entropy (nats)':<28} {before[0]:>15.3f} {after[0]:>14.3f} {after[1]:>8.3f}")
    print(f"{'KL(teacher ‖ student)':<28} {before[2]:>15.3f} {after[2]:>14.3f} {'':>8}")
    print(f"TRL's logs: loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f}, student entropy "
          f"{logs[0]['entropy']:.3f} -> {logs[-1]['entropy']:.3f} nats, completions "
          f"{logs[-1]['completions/mean_length']:.1f} tokens")
    with torch.no_grad():
        enc = tok(prompts[:3], return_tensors="pt", padding=True)
        torch.manual_seed(args.seed)
        out = student.generate(**enc, max_new_tokens=args.completion_len, do_sample=True, top_k=0,
                               temperature=args.temperature, pad_token_id=tok.pad_token_id)
    for p, o in zip(prompts[:3], tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
        print(f"  {p!r} -> {o!r}")
    total = time.perf_counter() - t0
    print(f"distillation {distil_s:.1f} s ({args.steps} steps), total {total:.1f} s")
    summary = dict(heldout_ce_before=before[0], heldout_ce_after=after[0], teacher_heldout_ce=after[1],
                   kl_before=before[2], kl_after=after[2], first_loss=logs[0]["loss"], last_loss=logs[-1]["loss"],
                   entropy=logs[-1]["entropy"], distil_seconds=distil_s, total_seconds=total,
                   steps=args.steps, teacher_steps=args.teacher_steps, beta=args.beta,
                   finite=all(math.isfinite(v) for v in (*before, *after)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
