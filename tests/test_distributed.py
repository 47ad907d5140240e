"""Data parallelism: two processes (gloo, CPU) give the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train import TINY as TRAIN_TINY
from test_train import merged as merged_params

ROOT = Path(__file__).resolve().parents[1]
# The train tests' tiny model, with dropout 0: each process draws its own dropout masks, which
# would make the runs differ by design.
TINY = merged_params(TRAIN_TINY, {"train": {"lora": {"dropout": 0.0}, "evals_per_epoch": 1}})


def _train(world_size: int, rank: int, out: Path, packing: bool, method: str = "lora") -> None:
    from stages.core.chat import encode_example
    from stages.core.modeling import load_tokenizer
    from stages.core.params import validate_params
    from stages.core.training import DistInfo, fit, select_distributed, trainable_state
    from stages.train import build_model_hf

    torch.set_num_threads(1)
    raw = json.loads(json.dumps(TINY))
    raw["train"]["packing"] = packing
    raw["train"]["method"] = method
    if method == "full":
        # 140-token rows: in one step of the second epoch the two processes get different numbers of
        # packed micro-batches, so FSDP's padding micro-batch (weighted 0) is exercised too.
        raw["train"]["pack_tokens"] = 140
    params = validate_params(raw)
    tok = load_tokenizer("embedded")
    rows = [json.loads(line) for line in (ROOT / "data/raw/corporate_qa.jsonl").read_text().splitlines()[:14]]
    ex = [encode_example(tok, r["system"], r["instruction"], r["output"]) for r in rows]
    torch.manual_seed(params.train.seed)
    model = build_model_hf(params, torch.device("cpu"), torch.float32)
    info = DistInfo(rank=rank, world_size=world_size, device=torch.device("cpu"))
    distributed = select_distributed("auto", method, world_size)
    result = fit(model, ex[:10], ex[10:], params.train, device=torch.device("cpu"), dist_info=info,
                 distributed=distributed, log=lambda _m: None)
    full = trainable_state(model)  # under FSDP a collective: every process gathers
    if rank == 0:
        keep = (lambda k: "lora_B" in k) if method == "lora" else (lambda k: "layers.1.mlp" in k or k.endswith("norm.weight"))
        state = {k: v.tolist() for k, v in full.items() if keep(k)}
        out.write_text(json.dumps({"history": result.history, "final_val": result.final_val_loss, "state": state,
                                   "distributed": distributed}))


def _worker(rank: int, world_size: int, port: int, out: str, packing: bool, method: str = "lora") -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _train(world_size, rank, Path(out), packing, method)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("packing", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_two_processes_match_one_process(tmp_path, packing):
    single = tmp_path / "single.json"
    _train(1, 0, single, packing)
    double = tmp_path / "ddp.json"
    mp.spawn(_worker, args=(2, _free_port(), str(double), packing), nprocs=2, join=True)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [3, 6]
    for a, b in zip(one["history"], two["history"]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-4)
    assert two["final_val"] == pytest.approx(one["final_val"], rel=1e-4)
    for name, value in one["state"].items():
        torch.testing.assert_close(torch.tensor(two["state"][name]), torch.tensor(value), rtol=1e-3, atol=1e-5)


def test_full_fine_tuning_with_fsdp_matches_one_process(tmp_path):
    """method full under two processes: FSDP (fully_shard, gloo on CPU) shards every decoder layer;
    losses and the gathered weights match one process with the same global batch."""
    single = tmp_path / "single.json"
    _train(1, 0, single, True, "full")
    double = tmp_path / "fsdp.json"
    mp.spawn(_worker, args=(2, _free_port(), str(double), True, "full"), nprocs=2, join=True)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["distributed"] == "fsdp"
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [3, 6]
    for a, b in zip(one["history"], two["history"]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-4)
    assert one["state"] and set(one["state"]) == set(two["state"])
    for name, value in one["state"].items():
        torch.testing.assert_close(torch.tensor(two["state"][name]), torch.tensor(value), rtol=1e-3, atol=1e-5)


def test_train_stage_under_torchrun_saves_the_gathered_full_model(tmp_path, root):
    """`torchrun --nproc_per_node 2 -m stages.train` with method full (FSDP): the saved weights are
    the full tensors and equal one process's; FSDP runs say that they write no checkpoint."""
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (root / "data/raw/corporate_qa.jsonl").read_text().splitlines()[:14]]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(method="full", learning_rate=0.0005, pack_tokens=140)
    raw["train"]["lora"]["modules_to_save"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def stage(out: str, nproc: int) -> dict:
        args = ["-m", "stages.train", "--params", str(tmp_path / "params.yaml"), "--data", str(data),
                "--output", str(tmp_path / out), "--checkpoints", str(tmp_path / f"{out}-ckpt"),
                "--metrics", str(tmp_path / f"{out}.json"), "--live", ""]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_port", str(_free_port())] if nproc > 1 else [sys.executable])
        done = subprocess.run(launcher + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return {**json.loads((tmp_path / f"{out}.json").read_text()), "log": done.stdout + done.stderr}

    one, two = stage("single", 1), stage("fsdp", 2)
    assert two["processes"] == 2 and two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4)
    a = load_file(tmp_path / "single/model/model.safetensors")
    b = load_file(tmp_path / "fsdp/model/model.safetensors")
    assert set(a) == set(b) and len(a) > 10
    for name in a:
        assert b[name].shape == a[name].shape, name   # full tensors, not shards
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
    assert (tmp_path / "single-ckpt/checkpoint.safetensors").is_file()
    assert not (tmp_path / "fsdp-ckpt/checkpoint.safetensors").exists() and "not written under FSDP" in two["log"]
