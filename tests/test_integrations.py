"""KDTrainer (fastkd.integrations.transformers) on tiny causal-LM configs."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fastkd  # noqa: E402
from fastkd._reference import kd as _reference  # noqa: E402
from fastkd.integrations.transformers import KDTrainer, head_input_capture  # noqa: E402

V, T = 97, 12  # odd vocabulary and sequence length on purpose


def _gpt2(n_layer, n_embd, seed, vocab=V):
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=T, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _llama(seed, vocab=V):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n, seed=0, ignore_frac=0.3):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, V, (n, T), generator=g)
        self.y = self.x.clone()
        self.y[torch.rand(n, T, generator=g) < ignore_frac] = -100
        self.y[0, :] = -100  # one sequence with no counted token at all

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i], "sample_id": torch.tensor(i)}


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True,
                report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _reference_loss(student, teacher, batch, **kd):
    """float64 reference of the trainer's loss from the models' full logits."""
    zs = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double()
    y = batch["labels"][:, 1:].reshape(-1)
    rows = _reference.kd_loss_rows(zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]),
                                   y.clamp_min(0), temperature=kd.get("temperature", 1.0),
                                   soft_weight=kd.get("soft_weight", 1.0), hard_weight=kd.get("hard_weight", 0.0),
                                   divergence=kd.get("divergence", "forward_kl"), beta=0.5,
                                   skew=kd.get("skew", 0.1), ignore_index=-100,
                                   label_smoothing=0.0, t2_scale=True, softcap=None)
    keep = y != -100
    return (rows * keep).sum() / keep.sum().clamp_min(1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_capture_is_the_head_input(arch):
    model = _gpt2(1, 16, 0) if arch == "gpt2" else _llama(0)
    x = torch.randint(0, V, (2, T))
    full = model(input_ids=x).logits
    with head_input_capture(model) as (head, store):
        out = model(input_ids=x).logits
    assert out.shape == (2, T, 0)
    rebuilt = torch.nn.functional.linear(store[0], head.weight, head.bias)
    torch.testing.assert_close(rebuilt, full, rtol=1e-5, atol=1e-5)
    assert model(input_ids=x).logits.shape == (2, T, V)  # the head is restored afterwards


@pytest.mark.parametrize("arch,kd", [
    ("gpt2", dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3)),
    ("llama", dict(temperature=1.0, soft_weight=1.0, hard_weight=0.0, divergence="reverse_kl")),
    ("gpt2", dict(temperature=1.5, soft_weight=1.0, hard_weight=0.2, divergence="tvd")),
    ("llama", dict(temperature=1.0, soft_weight=1.0, hard_weight=0.1, divergence="skew_forward_kl", skew=0.2)),
])
def test_compute_loss_matches_reference_loss_and_grads(tmp_path, arch, kd):
    student = _gpt2(1, 16, 1) if arch == "gpt2" else _llama(1)
    teacher = _gpt2(2, 24, 2) if arch == "gpt2" else _llama(2)
    data = _Data(3, seed=3)
    batch = {k: torch.stack([data[i][k] for i in range(3)]) for k in ("input_ids", "labels", "sample_id")}
    trainer = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=teacher, **kd)
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    ref = _reference_loss(student, teacher, batch, **kd)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert got.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad.double(), rtol=1e-4, atol=1e-6, msg=n)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def test_ce_only_and_hard_only_agree_with_the_models_own_loss(tmp_path):
    student, teacher = _gpt2(1, 16, 4), _gpt2(1, 16, 5)
    data = _Data(4, seed=4)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "labels", "sample_id")}
    own = student(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    plain = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data)
    hard_only = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=teacher,
                                    soft_weight=0.0, hard_weight=1.0)
    student.train()
    torch.testing.assert_close(plain.compute_loss(student, dict(batch)), own, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard_only.compute_loss(student, dict(batch)), own, rtol=1e-5, atol=1e-6)


def _one_step(tmp_path, micro, accum, teacher, seed_model=7):
    student = _gpt2(1, 16, seed_model)
    data = _Data(4, seed=8)
    trainer = KDTrainer(
        model=student, args=_args(tmp_path, per_device_train_batch_size=micro, gradient_accumulation_steps=accum),
        train_dataset=data, teacher=teacher, temperature=1.5, soft_weight=0.6, hard_weight=0.4)
    trainer.train()
    return {n: p.detach().clone() for n, p in student.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """4 sequences with unevenly ignored tokens: 4 micro-batches of 1 accumulate to the same SGD step
    as one batch of 4 (the loss is divided by num_items_in_batch of the whole step)."""
    teacher = _gpt2(2, 24, 9)
    start = {n: p.detach().clone() for n, p in _gpt2(1, 16, 7).named_parameters()}
    big = _one_step(tmp_path, micro=4, accum=1, teacher=teacher)
    acc = _one_step(tmp_path, micro=1, accum=4, teacher=teacher)
    moved = max((big[n] - start[n]).abs().max().item() for n in big)
    assert moved > 1e-3  # the step did something
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-6, msg=n)


def test_evaluate_reports_the_students_own_heldout_ce(tmp_path):
    student, teacher = _gpt2(1, 16, 10), _gpt2(1, 16, 11)
    data = _Data(4, seed=12)
    trainer = KDTrainer(model=student, args=_args(tmp_path, per_device_eval_batch_size=4),
                                  train_dataset=data, eval_dataset=data, teacher=teacher)
    metrics = trainer.evaluate()
    x, y = data.x, data.y
    with torch.no_grad():
        own = student(input_ids=x, labels=y).loss
    assert metrics["eval_loss"] == pytest.approx(own.item(), rel=1e-4)


def test_bad_arguments(tmp_path):
    student = _gpt2(1, 16, 0)
    data = _Data(2)
    with pytest.raises(TypeError, match="teacher"):
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher="gpt2")
    with pytest.raises(ValueError, match="tail"):
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=_gpt2(1, 16, 1),
                            tail="nope")
    with pytest.raises(ValueError, match="temperature"):
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=_gpt2(1, 16, 1),
                            temperature=0.0)
    with pytest.raises(TypeError, match="teacher_cache"):
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=_gpt2(1, 16, 1),
                            teacher_cache=object())


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_teacher_cache_filled_on_the_fly_then_served_without_teacher(tmp_path, mode):
    student, teacher = _gpt2(1, 16, 20), _gpt2(2, 24, 21)
    calls = []
    teacher.register_forward_hook(lambda m, a, kw_out: calls.append(1))
    data = _Data(4, seed=22)
    batch = {k: torch.stack([data[i][k] for i in (2, 0, 3)]) for k in ("input_ids", "labels", "sample_id")}
    cache = fastkd.TeacherCache(tmp_path / "cache", mode=mode, k=8, num_samples=16, vocab_size=V, sync=False)
    trainer = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=teacher,
                                  teacher_cache=cache, soft_weight=0.8, hard_weight=0.2)
    student.train()
    first = trainer.compute_loss(student, dict(batch))
    assert len(calls) == 1 and len(cache) == 3
    second = trainer.compute_loss(student, dict(batch))
    assert len(calls) == 1  # served from the cache: the teacher did not run again
    torch.testing.assert_close(first, second)
    second.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    # Reference: the sparse loss on the student's full logits against the stored rows.
    stored = cache.read(batch["sample_id"])
    zs = student(input_ids=batch["input_ids"]).logits[:, :-1]
    ref = fastkd.sparse_kd_loss(zs, stored, batch["labels"][:, 1:], tail="bucket" if mode == "topk" else "sampled",
                                soft_weight=0.8, hard_weight=0.2, backend="torch")
    ref.backward()
    torch.testing.assert_close(second, ref.detach(), rtol=1e-5, atol=1e-6)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)

    # A filled cache alone is a teacher; a sample it lacks is a clear error.
    cached_only = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=cache,
                                      soft_weight=0.8, hard_weight=0.2)
    torch.testing.assert_close(cached_only.compute_loss(student, dict(batch)), second)
    other = {k: torch.stack([data[i][k] for i in (1,)]) for k in ("input_ids", "labels", "sample_id")}
    with pytest.raises(ValueError, match="not in the TeacherCache"):
        cached_only.compute_loss(student, other)
    no_ids = {k: v for k, v in batch.items() if k != "sample_id"}
    with pytest.raises(ValueError, match="sample_id"):
        cached_only.compute_loss(student, no_ids)
    cache.close()


def test_cached_training_loop_keeps_sample_ids_and_fills_once(tmp_path):
    """Through Trainer.train(): the sample_id column survives column removal, two epochs fill the
    cache in the first and run the teacher no more in the second."""
    student, teacher = _gpt2(1, 16, 30), _gpt2(1, 16, 31)
    calls = []
    teacher.register_forward_hook(lambda m, a, out: calls.append(1))
    data = _Data(8, seed=32)
    cache = fastkd.TeacherCache(tmp_path / "c2", mode="topk", k=4, vocab_size=V, sync=False)
    trainer = KDTrainer(model=student, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=2,
                                                             per_device_train_batch_size=2),
                                  train_dataset=data, teacher=teacher, teacher_cache=cache)
    trainer.train()
    assert len(cache) == 8 and len(calls) == 4  # epoch 1: 4 micro-batches; epoch 2: none
    cache.close()


def test_sampled_capture_leaves_the_global_rng_alone(tmp_path):
    """Sampling draws from the trainer's own seeded generator: the global RNG (which seeds the data
    order of later epochs) is untouched, and the same args.seed gives the same stored draws."""
    data = _Data(4, seed=40)
    batch = {k: torch.stack([data[i][k] for i in (0, 1, 2)]) for k in ("input_ids", "labels", "sample_id")}
    stored = []
    for run in range(2):
        student, teacher = _gpt2(1, 16, 41), _gpt2(1, 16, 42)
        cache = fastkd.TeacherCache(tmp_path / f"s{run}", mode="sample", num_samples=16, vocab_size=V, sync=False)
        trainer = KDTrainer(model=student, args=_args(tmp_path, seed=5), train_dataset=data,
                                      teacher=teacher, teacher_cache=cache, hard_weight=0.5, soft_weight=0.5)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        trainer.compute_loss(student, dict(batch))
        assert torch.equal(torch.get_rng_state(), before)
        stored.append(cache.read(batch["sample_id"]))
        cache.close()
    assert torch.equal(stored[0].ids, stored[1].ids) and torch.equal(stored[0].counts, stored[1].counts)


def test_vocab_size_counts_only_the_first_rows_of_padded_heads(tmp_path):
    """Padded heads of different widths (a student head of V + 7 rows, a teacher head of V + 3): with
    vocab_size=V the loss is the reference on each model's first V logits, and the padding rows of
    the student's head get exactly zero gradient."""
    student, teacher = _llama(50, vocab=V + 7), _llama(51, vocab=V + 3)
    data = _Data(3, seed=52)
    batch = {k: torch.stack([data[i][k] for i in range(3)]) for k in ("input_ids", "labels", "sample_id")}
    kd = dict(temperature=2.0, soft_weight=0.6, hard_weight=0.4)
    with pytest.raises(ValueError, match=r"pass vocab_size=.*to KDTrainer"):
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=teacher, **kd)
    with pytest.raises(ValueError, match=r"vocab_size=101 exceeds the 100 rows of the teacher"):
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=teacher, vocab_size=V + 4)
    trainer = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=teacher, vocab_size=V, **kd)
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    head_grad = student.lm_head.weight.grad.clone()
    student.zero_grad(set_to_none=True)

    class _Sliced(torch.nn.Module):  # the reference sees only the first V logits of each model
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **kw):
            out = self.model(**kw)
            out.logits = out.logits[..., :V]
            return out

    ref = _reference_loss(_Sliced(student), _Sliced(teacher), batch, **kd)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head_grad[:V].double(), student.lm_head.weight.grad[:V].double(), rtol=1e-4, atol=1e-6)
    assert head_grad[:V].abs().max() > 0 and torch.all(head_grad[V:] == 0)

    # A TeacherCache filled on the fly stores the teacher's first V logits only.
    kd = dict(soft_weight=0.6, hard_weight=0.4)  # at the capture temperature, 1
    cache = fastkd.TeacherCache(tmp_path / "pad", mode="topk", k=8, vocab_size=V, sync=False)
    cached = KDTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher=teacher, teacher_cache=cache,
                       vocab_size=V, **kd)
    got = cached.compute_loss(student, dict(batch))
    zt = teacher(input_ids=batch["input_ids"]).logits[:, :-1, :V].float()
    stored = cache.read(batch["sample_id"])
    want = fastkd.capture(zt, k=8)
    assert stored.vocab_size == V and torch.equal(stored.ids, want.ids)
    torch.testing.assert_close(stored.values.float(), want.values.float(), rtol=0, atol=2e-3)
    zs = student(input_ids=batch["input_ids"]).logits[:, :-1, :V]
    torch.testing.assert_close(got, fastkd.sparse_kd_loss(zs, stored, batch["labels"][:, 1:], backend="torch", **kd),
                               rtol=1e-5, atol=1e-6)
    cache.close()


def test_the_former_name_still_imports_with_a_deprecation_warning():
    import fastkd.integrations.transformers as hf

    with pytest.warns(DeprecationWarning, match="KDTrainer"):
        old = hf.DistillationTrainer
    assert old is KDTrainer
    with pytest.warns(DeprecationWarning):
        from fastkd.integrations.transformers import DistillationTrainer  # noqa: F401
    with pytest.raises(AttributeError):
        hf.NoSuchTrainer
