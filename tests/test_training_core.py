"""The training loop's pieces: packing (no cross-record attention), loss heads, steps, choices, messages."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from stages.core.chat import EOT_ID, IGNORE_INDEX, PAD_ID, encode_example
from stages.core.params import ConfigError, validate_params
from stages.core.training import (CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE, TRAINING_CODE, collate,
                                  completion_loss_sum, epoch_steps, identity_key, library_versions, load_checkpoint,
                                  micro_batches, oom_message, pack, pack_groups, resume_key, run_identity,
                                  save_checkpoint, select_backend, training_code_hashes,
                                  select_distributed, select_loss_head, check_method, shard)

RECORDS = [
    ("You are helpful.", "What does the PM job code mean?", "PM job code indicates Full Time Employee."),
    ("You are helpful.", "How many vacation days do I get?", "Employees get 25 days of paid vacation a year."),
    ("", "Who approves purchases above $5,000?", "A director approves purchases above $5,000."),
]


def tiny_params(**train):
    raw = {"model": {"embedded": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                  "intermediate_size": 64}},
           "train": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **train}}
    return validate_params(raw)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [encode_example(tokenizer, *r) for r in RECORDS]


@pytest.fixture(scope="module")
def model():
    from stages.core.modeling import load_base_model

    m = load_base_model(tiny_params().model)
    m.eval()
    return m


def test_pack_resets_positions_and_shifts_targets_inside_each_record(examples):
    batch = pack(examples)
    lengths = [len(e.input_ids) for e in examples]
    assert batch.input_ids.shape == (1, sum(lengths))
    assert batch.attention_mask is None
    assert PAD_ID not in batch.input_ids.tolist()[0]
    pos = batch.position_ids[0].tolist()
    start = 0
    for e, n in zip(examples, lengths):
        assert pos[start:start + n] == list(range(n))
        # the last token of a record (its <|eot_id|>) predicts nothing: no target crosses records
        assert batch.input_ids[0, start + n - 1] == EOT_ID
        assert batch.targets[0, start + n - 1] == IGNORE_INDEX
        assert batch.targets[0, start:start + n - 1].tolist() == e.labels[1:]
        start += n
    assert batch.num_label_tokens == sum(e.num_completion_tokens for e in examples)
    assert batch.num_real_tokens == sum(lengths)


def test_packed_logits_equal_each_record_alone(model, examples):
    """No cross-record attention: every record's logits inside a pack equal its logits alone."""
    with torch.no_grad():
        packed = pack(examples)
        inside = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            n = len(e.input_ids)
            torch.testing.assert_close(inside[start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n


def test_packing_without_position_reset_would_leak(model, examples):
    """The control: with plain 0..T-1 positions the same pack attends across records."""
    with torch.no_grad():
        packed = pack(examples)
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits[0]
        n0 = len(examples[0].input_ids)
        second = model(input_ids=torch.tensor([examples[1].input_ids]), use_cache=False).logits[0]
        assert not torch.allclose(leaky[n0:n0 + len(examples[1].input_ids)], second, atol=1e-3)


def test_packed_and_padded_losses_agree(model, examples):
    with torch.no_grad():
        packed_loss, packed_n = completion_loss_sum(model, pack(examples))
        padded_loss, padded_n = completion_loss_sum(model, collate(examples))
        full_loss, full_n = completion_loss_sum(model, collate(examples), head_mode="full")
    assert packed_n == padded_n == full_n == sum(e.num_completion_tokens for e in examples)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(full_loss, padded_loss, rtol=1e-4, atol=1e-3)


def test_collate_pads_with_finetune_pad_and_masks(examples):
    batch = collate(examples)
    longest = max(len(e.input_ids) for e in examples)
    short = min(range(3), key=lambda i: len(examples[i].input_ids))
    n = len(examples[short].input_ids)
    assert batch.input_ids.shape == (3, longest)
    assert set(batch.input_ids[short, n:].tolist()) <= {PAD_ID}
    assert batch.attention_mask[short, n:].sum() == 0
    assert (batch.targets[short, n - 1:] == IGNORE_INDEX).all()


def test_pack_groups_respect_the_token_budget(examples):
    lengths = [len(e.input_ids) for e in examples]
    groups = pack_groups(examples, lengths[0] + lengths[1])
    assert [len(g) for g in groups] == [2, 1]
    assert [len(g) for g in pack_groups(examples, 1)] == [1, 1, 1]  # a longer record gets its own row
    assert len(micro_batches(examples, 2, packing=False, pack_tokens=0)) == 2


def test_epoch_steps_are_seeded_complete_and_give_every_process_a_record():
    steps = epoch_steps(50, 16, epoch=0, seed=42)
    assert sorted(i for s in steps for i in s) == list(range(50))
    assert steps == epoch_steps(50, 16, epoch=0, seed=42)
    assert steps != epoch_steps(50, 16, epoch=1, seed=42)
    merged = epoch_steps(49, 16, epoch=0, seed=1, world_size=2)  # 16+16+16+1 -> last merged
    assert [len(s) for s in merged] == [16, 16, 17]
    assert shard(list(range(7)), 1, 2) == [1, 3, 5]


def test_backend_selection_and_messages():
    assert select_backend("hf", False, cuda=True, unsloth_installed=True).value == "hf"
    assert select_backend("auto", False, cuda=True, unsloth_installed=True).value == "unsloth"
    auto = select_backend("auto", False, cuda=False, unsloth_installed=False)
    assert auto.value == "hf" and "CUDA GPU" in auto.note
    fallback = select_backend("unsloth", True, cuda=False, unsloth_installed=True)
    assert fallback.value == "hf" and "allow_backend_fallback" in fallback.note
    with pytest.raises(ConfigError, match=r"train.backend: unsloth was asked for but unsloth needs a CUDA GPU"):
        select_backend("unsloth", False, cuda=False, unsloth_installed=True)
    with pytest.raises(ConfigError, match=r"the unsloth package \(pip install -r requirements-gpu.txt\)"):
        select_backend("unsloth", False, cuda=True, unsloth_installed=False)


def test_qlora_needs_cuda_and_bitsandbytes():
    check_method("lora", cuda=False, bitsandbytes_installed=False)
    check_method("qlora", cuda=True, bitsandbytes_installed=True)
    with pytest.raises(ConfigError, match=r"train.method: qlora needs a CUDA GPU .* and the bitsandbytes package"):
        check_method("qlora", cuda=False, bitsandbytes_installed=False)


def test_loss_head_selection():
    assert select_loss_head("auto", cuda=True, liger_installed=True).value == "liger"
    cpu = select_loss_head("auto", cuda=False, liger_installed=True)
    assert cpu.value == "completion" and "CUDA" in cpu.note
    assert select_loss_head("none", cuda=True, liger_installed=True).value == "completion"
    with pytest.raises(ConfigError, match="train.fused_loss: liger was asked for but liger-kernel needs CUDA"):
        select_loss_head("liger", cuda=False, liger_installed=True)


def test_distributed_selection():
    assert select_distributed("auto", "lora", 1) == "none"
    assert select_distributed("auto", "lora", 2) == "ddp"
    assert select_distributed("auto", "full", 2) == "fsdp"
    with pytest.raises(ConfigError, match="fsdp"):
        validate_params({"train": {"method": "qlora", "distributed": "fsdp"}})


def test_oom_message_names_the_remedies():
    message = oom_message(validate_params({"train": {"packing": False}}).train, torch.device("cpu"), "training")
    for remedy in ("train.batch_size (now 4)", "gradient_accumulation_steps", "gradient_checkpointing: true",
                   "train.lora.r", "max_seq_length", "method: qlora", "stages.dry_run"):
        assert remedy in message
    assert "pack_tokens" in oom_message(tiny_params(packing=True).train, torch.device("cpu"), "training")


def test_checkpoint_is_resumed_only_with_the_same_key(tmp_path):
    p = tiny_params().model_dump(mode="json")
    key = resume_key(p, "data-1")
    assert key == resume_key(p, "data-1")
    assert key != resume_key(p, "data-2")
    other = tiny_params(learning_rate=0.01).model_dump(mode="json")
    assert key != resume_key(other, "data-1")
    state, message = load_checkpoint(tmp_path, key)
    assert state is None and "starting fresh" in message
    assert save_checkpoint(tmp_path, {"resume_key": key, "step": 3, "epoch": 0}) is None
    state, message = load_checkpoint(tmp_path, key)
    assert state["step"] == 3 and "resuming" in message
    state, message = load_checkpoint(tmp_path, resume_key(other, "data-1"),
                                     run_identity(other, "data-1"))
    assert state is None and "resume key differs" in message
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"torn")
    state, message = load_checkpoint(tmp_path, key)
    assert state is None and "unreadable" in message


def test_checkpoint_round_trips_optimizer_scheduler_and_rng_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    state = {"resume_key": "k", "step": 1, "epoch": 0, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "best_state": None,
             "history": [{"step": 1, "val/loss": 2.5}], "trainable": {"w": model.weight.detach().clone()}}
    assert save_checkpoint(tmp_path, state) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    assert (tmp_path / CHECKPOINT_FILE).read_bytes()[:2] != b"\x80\x02", "not a pickle"
    loaded, _ = load_checkpoint(tmp_path, "k")
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["torch_rng"], state["torch_rng"]) and torch.equal(loaded["trainable"]["w"], model.weight)
    assert loaded["history"] == state["history"] and loaded["best_state"] is None


class _Payload:
    """A pickle that runs code when loaded: what a crafted checkpoint.pt holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    key = resume_key(tiny_params().model_dump(mode="json"), "data")
    (folder / LEGACY_CHECKPOINT_FILE).write_bytes(pickle.dumps({"resume_key": key, "x": _Payload(marker)}))
    state, message = load_checkpoint(folder, key)
    assert state is None and not marker.exists(), "the payload must not run"
    assert f"refused {folder / LEGACY_CHECKPOINT_FILE}: a pickle checkpoint" in message and "starting fresh" in message
    # the same bytes under the new name are no safetensors file: unreadable, still never unpickled
    (folder / CHECKPOINT_FILE).write_bytes((folder / LEGACY_CHECKPOINT_FILE).read_bytes())
    state, message = load_checkpoint(folder, key)
    assert state is None and "unreadable" in message and not marker.exists()


def test_a_code_or_library_change_starts_fresh_and_says_why(tmp_path, root):
    p = tiny_params().model_dump(mode="json")
    code = training_code_hashes()
    assert set(code) == {f"stages/{name}" for name in TRAINING_CODE}
    libraries = library_versions()
    assert {"python", "torch", "transformers", "peft"} <= set(libraries)
    identity = run_identity(p, "data", code=code, libraries=libraries)
    save_checkpoint(tmp_path, {"resume_key": identity_key(identity), "identity": identity, "step": 2, "epoch": 0})

    # a copy of the training code, edited as in issue 13 (the learning rate multiplied by 0)
    package = tmp_path / "stages"
    (package / "core").mkdir(parents=True)
    for name in TRAINING_CODE:
        (package / name).write_bytes((root / "stages" / name).read_bytes())
    source = (package / "core/training.py").read_text()
    assert "lr=train.learning_rate," in source
    (package / "core/training.py").write_text(source.replace("lr=train.learning_rate,", "lr=train.learning_rate * 0.0,"))
    edited = {f"stages/{name}": hashlib.sha256((package / name).read_bytes()).hexdigest() for name in TRAINING_CODE}
    changed = run_identity(p, "data", code=edited, libraries=libraries)
    state, message = load_checkpoint(tmp_path, identity_key(changed), changed)
    assert state is None
    assert "(resume key differs: the training code changed (stages/core/training.py)): starting fresh" in message

    newer = run_identity(p, "data", code=code, libraries={**libraries, "torch": "99.0"})
    state, message = load_checkpoint(tmp_path, identity_key(newer), newer)
    assert state is None and f"library versions changed (torch {libraries['torch']} -> 99.0)" in message
    state, message = load_checkpoint(tmp_path, identity_key(identity), identity)
    assert state["step"] == 2


def test_the_hashed_training_code_covers_what_train_imports(root):
    """Every stages module that stages/train.py or the training core imports is hashed, except the
    ones that only do I/O and error reporting."""
    import ast

    not_training = {"core/cli.py", "core/io.py", "core/records.py", "core/perf.py"}
    imported = set()
    for name in ("train.py", "core/training.py", "core/modeling.py"):
        for node in ast.walk(ast.parse((root / "stages" / name).read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level != 1 or not node.module:
                continue
            if name == "train.py" and node.module == "core":
                imported.update(f"core/{alias.name}.py" for alias in node.names)
            elif name == "train.py" and node.module.startswith("core."):
                imported.add(f"core/{node.module[5:]}.py")
            elif name != "train.py":
                imported.add(f"core/{node.module}.py")
    assert "core/chat.py" in imported and "core/training.py" in imported
    imported = {m for m in imported if (root / "stages" / m).is_file()}
    assert imported - not_training <= set(TRAINING_CODE), imported - not_training - set(TRAINING_CODE)


def test_a_failed_checkpoint_write_warns_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    assert save_checkpoint(tmp_path, {"resume_key": "k", "step": 1, "epoch": 0}) is None
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    warning = save_checkpoint(tmp_path, {"resume_key": "k", "step": 2, "epoch": 0, "w": torch.zeros(1000)})
    assert warning.startswith(f"warning: checkpoint not written to {tmp_path / CHECKPOINT_FILE} (OSError: ")
    assert "training continues" in warning
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE], "no .tmp left behind"
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


def test_an_interrupt_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    assert save_checkpoint(tmp_path, {"resume_key": "k", "step": 1, "epoch": 0}) is None

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"resume_key": "k", "step": 2, "epoch": 0})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    assert load_checkpoint(tmp_path, "k")[0]["step"] == 1


# ---------------------------------------------------------------------------------------------
# Shared-prefix packing: the same loss and LoRA gradients as the records computed one by one

SHARED = [  # two system prompts (one of them long), records of different lengths, one without a system turn
    ("You are the HR assistant of Contoso. Answer in one sentence, using the handbook only.",
     "What does the PM job code mean?", "PM job code indicates Full Time Employee."),
    ("You are the HR assistant of Contoso. Answer in one sentence, using the handbook only.",
     "How many vacation days do I get per year if I joined in March?", "Employees get 25 days of paid vacation a year."),
    ("You are the IT helpdesk.", "How do I reset my password?", "Use the self-service portal."),
    ("You are the HR assistant of Contoso. Answer in one sentence, using the handbook only.",
     "Who approves purchases?", "A director approves purchases above $5,000, a manager below."),
    ("You are the IT helpdesk.", "Is there a VPN?", "Yes: install the client from the software centre and sign in."),
    ("", "Where is the cafeteria?", "On the ground floor."),
]


def _lora_model():
    from peft import LoraConfig, get_peft_model

    from stages.core.modeling import load_base_model

    torch.manual_seed(0)
    base = load_base_model(tiny_params().model)
    # init_lora_weights=False: both LoRA matrices random, so A's gradient is not zero (B = 0 would make it)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    model.eval()
    return model


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for batch in batches:
        loss, n = completion_loss_sum(model, batch)
        loss.backward()
        total, count = total + float(loss.detach()), count + n
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return total, count, grads


@pytest.mark.parametrize("tok_fixture", ["tokenizer", "smol_tokenizer"], ids=["llama3", "chatml"])
def test_shared_prefix_rows_give_the_per_record_loss_and_lora_gradients(request, tok_fixture):
    from stages.core.chat import chat_format
    from stages.core.training import pack_segments, segments

    fmt = chat_format(request.getfixturevalue(tok_fixture))
    examples = [fmt.encode(*r) for r in SHARED]
    assert all(e.prefix_len > 0 for e in examples)
    assert examples[0].input_ids[:examples[0].prefix_len] == examples[1].input_ids[:examples[1].prefix_len]
    model = _lora_model()

    alone = _loss_and_grads(model, [pack([e]) for e in examples])
    shared_batches = micro_batches(examples, 16, packing=True, pack_tokens=4096, shared_prefix=True)
    shared = _loss_and_grads(model, shared_batches)

    # the prefixes were shared: 2 segments of several records, the third prefix (no system) alone
    segs = segments(examples, 4096)
    assert [len(s.records) for s in segs] == [3, 2, 1]
    computed = sum(b.num_computed_tokens for b in shared_batches)
    assert computed < sum(len(e.input_ids) for e in examples)
    assert sum(b.num_real_tokens for b in shared_batches) == sum(len(e.input_ids) for e in examples)
    # the same labelled tokens, the same summed loss, the same gradients (fp32 summation order aside)
    assert shared[1] == alone[1]
    assert shared[0] == pytest.approx(alone[0], rel=1e-5)
    assert shared[2].keys() == alone[2].keys()
    for name, grad in alone[2].items():
        # fp32 tolerance relative to the tensor's scale (the summed loss is ~800: gradients reach ~50)
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)

    # the prompt stays out of the loss and the end-of-turn token is in it
    row = pack_segments(segs)
    targets, ids = row.targets[0].tolist(), row.input_ids[0].tolist()
    assert sum(t != IGNORE_INDEX for t in targets) == sum(e.num_completion_tokens for e in examples)
    assert targets.count(fmt.eot_id) == len(examples)


def test_a_mask_that_lets_a_record_see_another_changes_the_loss(tokenizer):
    """The equality above depends on the mask: open it between the records of a segment and the loss moves."""
    from stages.core.chat import chat_format

    fmt = chat_format(tokenizer)
    examples = [fmt.encode(*r) for r in SHARED[:2]]
    model = _lora_model()
    batch = micro_batches(examples, 16, packing=True, pack_tokens=4096, shared_prefix=True)[0]
    honest = float(completion_loss_sum(model, batch)[0])
    n = batch.input_ids.shape[1]
    batch.attention_mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]  # plain causal: sees the other record
    leaky = float(completion_loss_sum(model, batch)[0])
    assert abs(leaky - honest) > 1e-3 * abs(honest)


def test_unshareable_records_pack_as_before(tokenizer):
    """No prefix in common (or training on the prompt too): the rows are today's packed rows."""
    from stages.core.chat import chat_format

    fmt = chat_format(tokenizer)
    distinct = [fmt.encode(*SHARED[0]), fmt.encode(*SHARED[2]), fmt.encode(*SHARED[5])]
    plain = micro_batches(distinct, 16, packing=True, pack_tokens=4096, shared_prefix=False)
    shared = micro_batches(distinct, 16, packing=True, pack_tokens=4096, shared_prefix=True)
    assert [b.input_ids.tolist() for b in shared] == [b.input_ids.tolist() for b in plain]
    assert all(b.attention_mask is None for b in shared)
    full_sequence = [fmt.encode(*r, completion_only=False) for r in SHARED[:2]]
    rows = micro_batches(full_sequence, 16, packing=True, pack_tokens=4096, shared_prefix=True)
    assert rows[0].attention_mask is None and rows[0].num_computed_tokens == sum(len(e.input_ids) for e in full_sequence)
