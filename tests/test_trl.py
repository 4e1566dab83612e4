"""fastkd.integrations.trl on tiny causal LMs: per-step losses against TRL's own trainers (with and
without gradient accumulation, generation on CPU included), the terms TRL lacks against the float64
reference, the teacher cache on off-policy steps, and the TRL internals the integration relies on."""
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import fastkd  # noqa: E402
from fastkd._reference import kd as _reference  # noqa: E402
from fastkd.integrations import trl as fkd_trl  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
PROMPTS = ["the cat", "a dog is", "hello", "one two", "it was", "so we", "red and", "in the"]


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [])), pad_token="<pad>",
                                   eos_token="<eos>", padding_side="left")


def _llama(seed, hidden, vocab=len(CHARS) + 2, head_scale=1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper distributions than a fresh init: a loss well above rounding
        model.lm_head.weight.mul_(head_scale)
    return model


def _recording(cls):
    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.batches.append({k: v for k, v in inputs.items()})
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(loss.item())
            return loss
    Recording.__name__ = cls.__name__
    return Recording


def _distill_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                max_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1, max_completion_length=6, bf16=False,
                gradient_checkpointing=False, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                beta=0.5, temperature=0.9, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return trl.DistillationConfig(**base)


def _run_distillation(cls, tmp_path, **kw):
    fastkd_kw = {k: kw.pop(k) for k in ("hard_weight", "t2_scale", "temperature_loss") if k in kw}
    if "temperature_loss" in fastkd_kw:
        fastkd_kw["temperature"] = fastkd_kw.pop("temperature_loss")
    trainer = _recording(cls)(model=_llama(1, 16, head_scale=4.0), teacher_model=_llama(2, 24, head_scale=8.0),
                              args=_distill_config(tmp_path, **kw),
                              train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS[:4]}),
                              processing_class=_tokenizer(), **fastkd_kw)
    trainer.batches, trainer.losses = [], []
    trainer.train()
    return trainer


@pytest.mark.parametrize("accum", [1, 2])
def test_distillation_trainer_equals_trls_step_by_step(tmp_path, accum):
    """The same seed, models and config: TRL samples the same completions for both trainers, and
    every micro-batch loss, the logged losses and entropies, and the trained weights agree."""
    ours = _run_distillation(fkd_trl.FastKDDistillationTrainer, tmp_path, gradient_accumulation_steps=accum)
    theirs = _run_distillation(trl.DistillationTrainer, tmp_path, gradient_accumulation_steps=accum)
    assert len(ours.losses) == len(theirs.losses) == 2 * accum
    for a, b in zip(ours.batches, theirs.batches):
        assert torch.equal(a["completion_ids"], b["completion_ids"])  # generation ran, identically
    assert ours.batches[0]["completion_mask"].sum() > 0
    assert min(ours.losses) > 1e-2  # far above float32 rounding
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(theirs.losses), rtol=2e-5, atol=1e-7)
    logs = [(h["loss"], h["entropy"]) for h in ours.state.log_history if "loss" in h]
    ref = [(h["loss"], h["entropy"]) for h in theirs.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(e > 0 for _, e in logs)
    torch.testing.assert_close(torch.tensor(logs), torch.tensor(ref), rtol=2e-5, atol=1e-7)
    for (n, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_distillation_trainer_hard_label_and_t2_terms(tmp_path):
    """The terms TRL lacks: τ² and a hard-label CE on the completion tokens, against the float64
    reference on the models' own logits of a recorded micro-batch."""
    trainer = _run_distillation(fkd_trl.FastKDDistillationTrainer, tmp_path, max_steps=1, hard_weight=0.3,
                                t2_scale=True, temperature_loss=2.0, beta=0.2, learning_rate=0.0)
    batch = trainer.batches[0]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    k = batch["completion_ids"].shape[1]
    with torch.no_grad():
        zs = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1].double()
        zt = trainer.teacher_model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1].double()
    keep = batch["completion_mask"].reshape(-1) != 0
    rows = _reference.kd_loss_rows(zs.reshape(-1, zs.shape[-1])[keep], zt.reshape(-1, zt.shape[-1])[keep],
                                   batch["completion_ids"].reshape(-1)[keep], temperature=2.0, soft_weight=1.0,
                                   hard_weight=0.3, divergence="jsd", beta=0.2, skew=0.1, ignore_index=-100,
                                   label_smoothing=0.0, t2_scale=True, softcap=None)
    want = rows.sum() / batch["num_items_in_batch"].double()
    assert trainer.losses[0] == pytest.approx(want.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# GKD: mixed on- and off-policy steps
# ------------------------------------------------------------------------------------------------
COMPLETIONS = ["sat on the mat", "barking loud", "there you", "three four", "a dark night", "it goes",
               "blue", "morning light"]


class _Collator:
    """input_ids / attention_mask / labels (-100 on the prompt and padding) right-padded to ``width``
    tokens (a TeacherCache stores every sample at one length), the left-padded prompts GKD generates
    from, and the sample indices."""

    def __init__(self, tok, width=24):
        self.tok, self.width = tok, width

    def __call__(self, rows):
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        prompts = [self.tok(r["prompt"])["input_ids"] for r in rows]
        full = [p + self.tok(r["completion"])["input_ids"] + [eos] for p, r in zip(prompts, rows)]
        width, pwidth = self.width, max(map(len, prompts))
        ids = torch.tensor([f + [pad] * (width - len(f)) for f in full])
        att = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
        labels = ids.clone()
        labels[att == 0] = -100
        for i, p in enumerate(prompts):
            labels[i, :len(p)] = -100
        return {"input_ids": ids, "attention_mask": att, "labels": labels,
                "prompts": torch.tensor([[pad] * (pwidth - len(p)) + p for p in prompts]),
                "prompt_attention_mask": torch.tensor([[0] * (pwidth - len(p)) + [1] * len(p) for p in prompts]),
                "sample_id": torch.tensor([r["sample_id"] for r in rows])}


def _gkd_data(n=4):
    return datasets.Dataset.from_dict({"prompt": PROMPTS[:n], "completion": COMPLETIONS[:n],
                                       "sample_id": list(range(n))})


def _gkd_config(tmp_path, **kw):
    from trl.experimental.gkd import GKDConfig

    base = dict(output_dir=str(tmp_path / "gkd"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                max_steps=4, learning_rate=0.5, optim="sgd", logging_steps=1, max_new_tokens=5, bf16=False,
                gradient_checkpointing=False, report_to="none", use_cpu=True, save_strategy="no", seed=3,
                lmbda=0.5, beta=0.3, temperature=0.9, disable_tqdm=True, dataloader_num_workers=0,
                shuffle_dataset=False)
    base.update(kw)
    return GKDConfig(**base)


def _run_gkd(cls, tmp_path, teacher="live", fastkd_kw=None, **kw):
    tok = _tokenizer()
    teacher_model = _llama(5, 24, head_scale=8.0) if teacher == "live" else None
    trainer = _recording(cls)(model=_llama(4, 16, head_scale=4.0), teacher_model=teacher_model,
                              args=_gkd_config(tmp_path, **kw), train_dataset=_gkd_data(), processing_class=tok,
                              data_collator=_Collator(tok), **(fastkd_kw or {}))
    trainer.batches, trainer.losses = [], []
    trainer.train()
    return trainer


@pytest.mark.parametrize("accum", [1, 2])
def test_gkd_trainer_equals_trls_step_by_step(tmp_path, accum):
    from trl.experimental.gkd import GKDTrainer

    ours = _run_gkd(fkd_trl.FastKDGKDTrainer, tmp_path, gradient_accumulation_steps=accum)
    theirs = _run_gkd(GKDTrainer, tmp_path, gradient_accumulation_steps=accum)
    assert len(ours.losses) == len(theirs.losses) == 4 * accum
    on_policy = ["sample_id" not in b for b in ours.batches]  # dropped when the sequences were replaced
    assert any(on_policy) and not all(on_policy), on_policy  # a mixed run
    for a, b in zip(ours.batches, theirs.batches):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert min(ours.losses) > 3e-3  # far above float32 rounding
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(theirs.losses), rtol=2e-5, atol=1e-7)
    for (n, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_gkd_teacher_cache_serves_the_off_policy_steps(tmp_path):
    """lmbda=0: every step is off-policy. With a live teacher and a cache, the first epoch fills the
    cache and the second runs no teacher; every loss equals sparse_kd_loss on the student's logits
    against the stored rows; a trainer with the cache alone gives the same losses."""
    from trl.experimental.gkd import GKDTrainer  # noqa: F401  (the class the trainer subclasses)

    cache = fastkd.TeacherCache(tmp_path / "cache", mode="topk", k=6, vocab_size=len(CHARS) + 2, sync=False)
    kw = dict(lmbda=0.0, beta=0.0, max_steps=4, learning_rate=0.0, seed=1)  # 2 epochs, weights fixed
    calls = []
    trainer = _recording(fkd_trl.FastKDGKDTrainer)(
        model=_llama(4, 16, head_scale=4.0), teacher_model=_llama(5, 24, head_scale=8.0),
        args=_gkd_config(tmp_path, **kw), train_dataset=_gkd_data(), processing_class=_tokenizer(),
        data_collator=_Collator(_tokenizer()), teacher_cache=cache, hard_weight=0.2)
    trainer.teacher_model.register_forward_hook(lambda *a: calls.append(1))
    trainer.batches, trainer.losses = [], []
    trainer.train()
    assert len(cache) == 4 and len(calls) == 2  # epoch 1 fills, epoch 2 reads
    for batch, loss in zip(trainer.batches, trainer.losses):  # filled (epoch 1) or read (epoch 2)
        zs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        want = fastkd.sparse_kd_loss(zs, cache.read(batch["sample_id"]), batch["labels"][:, 1:], hard_weight=0.2,
                                     backend="torch")
        assert loss == pytest.approx(want.item(), rel=1e-5)

    alone = _run_gkd(fkd_trl.FastKDGKDTrainer, tmp_path, teacher=None,
                     fastkd_kw=dict(teacher_cache=cache, hard_weight=0.2), **kw)
    torch.testing.assert_close(torch.tensor(alone.losses), torch.tensor(trainer.losses), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="lmbda=0.0"):
        _run_gkd(fkd_trl.FastKDGKDTrainer, tmp_path, teacher=None, fastkd_kw=dict(teacher_cache=cache), lmbda=0.5)
    with pytest.raises(ValueError, match="forward KL only"):
        _run_gkd(fkd_trl.FastKDGKDTrainer, tmp_path, fastkd_kw=dict(teacher_cache=cache), beta=0.5)
    cache.close()


# ------------------------------------------------------------------------------------------------
# The TRL internals, the supported versions
# ------------------------------------------------------------------------------------------------
def test_every_trl_internal_the_integration_uses_is_there(monkeypatch):
    """Fails loudly when a TRL release drops an internal the integration relies on."""
    from trl.experimental.gkd import GKDTrainer

    fkd_trl.check_trl_internals(kind="DistillationTrainer")
    fkd_trl.check_trl_internals(kind="GKDTrainer")
    for kind, cls in (("DistillationTrainer", trl.DistillationTrainer), ("GKDTrainer", GKDTrainer)):
        for name in fkd_trl.TRL_CLASS_ATTRIBUTES[kind]:
            assert hasattr(cls, name), f"trl {trl.__version__}: {kind}.{name} is gone"
    monkeypatch.delattr(trl.DistillationTrainer, "_generate_and_score_completions")
    with pytest.raises(RuntimeError, match=r"lacks DistillationTrainer\._generate_and_score_completions"):
        fkd_trl.check_trl_internals(kind="DistillationTrainer")


def test_the_installed_trl_is_a_supported_one_and_the_extra_says_so():
    assert fkd_trl.trl_version_supported(), trl.__version__
    assert trl.__version__ in fkd_trl.TRL_VERSIONS_CHECKED
    assert not fkd_trl.trl_version_supported("1.15.2") and not fkd_trl.trl_version_supported("1.17.0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        text = f.read()
    extra = re.search(r'^trl = \["trl(.*?)"', text, re.M)
    assert extra and extra.group(1) == ",".join(fkd_trl.TRL_SUPPORTED)


# ------------------------------------------------------------------------------------------------
# The example
# ------------------------------------------------------------------------------------------------
def test_the_on_policy_example_runs_at_a_tiny_size(tmp_path, capsys):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "trl_on_policy.py"
    spec = importlib.util.spec_from_file_location("_fastkd_example_trl_on_policy", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = example.corpus_text()
    assert len(text) > 50_000 and set(text) <= set(example.CHARS)
    out = tmp_path / "summary.json"
    assert example.main(["--teacher-steps", "3", "--steps", "2", "--batch", "4", "--block", "16", "--prompt-len", "8",
                         "--completion-len", "4", "--teacher-hidden", "16", "--student-hidden", "8", "--quiet",
                         "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KL(teacher ‖ student)" in printed and "distillation" in printed
    summary = json.loads(out.read_text())
    assert summary["finite"] and summary["steps"] == 2 and summary["kl_before"] > 0
    assert summary["entropy"] > 0 and summary["first_loss"] > 0
