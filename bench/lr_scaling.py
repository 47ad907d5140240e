"""Token-budget steps against the preset's steps: which learning-rate rule keeps the loss.

    python -m bench.lr_scaling                                   # SmolLM2-135M (pretrained), 400 records
    python -m bench.lr_scaling --records 2000 --runs 0 4096:linear 4096:sqrt
    python -m bench.lr_scaling --model embedded --runs 0 16384:sqrt   # the random-weight model

`train.tokens_per_step` makes each optimizer step hold more records, so one epoch has fewer steps;
`train.lr_scaling` says how the learning rate follows (stages.core.training.scaled_learning_rate).
Each run trains a fresh LoRA on the same records for one epoch, with the model's preset (learning rate,
LoRA rank, packing) and the benchmark's fixed schedule (bench.train_bench), and reports the final
validation loss (mean completion-token cross-entropy on the held-out records, every 10th). A run is
`TOKENS:RULE`; `0` is the preset's own steps (batch_size x gradient_accumulation_steps records), the
reference the others are compared with. One process, runs in the order given; CPU or CUDA.
"""

from __future__ import annotations

import argparse


def parse_run(text: str) -> tuple[int, str]:
    tokens, _, rule = text.partition(":")
    rule = rule or "sqrt"
    if not tokens.isdigit() or rule not in ("sqrt", "linear", "none"):
        raise argparse.ArgumentTypeError(f"run {text!r}: expected TOKENS or TOKENS:sqrt|linear|none, e.g. 2048:linear")
    return int(tokens), rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "embedded"))
    parser.add_argument("--records", type=int, default=400, help="first N records of the data (a tenth held out)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in
                        ("0", "2048:none", "2048:sqrt", "2048:linear")])
    args = parser.parse_args(argv)

    import torch

    from bench.gpu_parts import DATA
    from bench.train_bench import bench_params, encode_rows, load_records, measure_variant, with_preset
    from stages.core.modeling import load_tokenizer, resolve_dtype
    from stages.core.training import epoch_steps, with_token_budget

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = with_preset(bench_params(1), args.model, 1)
    tokenizer = load_tokenizer(params.model.tokenizer)
    train_rows, val_rows = load_records(DATA, args.records)
    train_ex, val_ex = encode_rows(tokenizer, train_rows), encode_rows(tokenizer, val_rows)
    mean = sum(len(e.input_ids) for e in train_ex) / len(train_ex)
    print(f"{args.model}, {len(train_ex)} training records (mean {mean:.1f} tokens), {len(val_ex)} held out, "
          f"1 epoch, {device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print("| tokens_per_step | lr_scaling | records/step | steps | learning rate | final val loss | vs the preset's steps | train s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    reference = None
    for tokens, rule in args.runs:
        train = with_token_budget(params.train.model_copy(update={"tokens_per_step": tokens, "lr_scaling": rule,
                                                                  "epochs": 1}), train_ex)
        run_params = params.model_copy(update={"train": train})
        per_step = train.batch_size * train.gradient_accumulation_steps
        steps = len(epoch_steps(len(train_ex), per_step, 0, train.seed))
        result = measure_variant("ours", args.model, run_params, tokenizer, train_ex, val_ex, device,
                                 resolve_dtype(train.precision, device))
        loss = result["final_val_loss"]
        if tokens == 0 and reference is None:
            reference = loss
        versus = f"{loss - reference:+.4f}" if reference is not None else "-"
        print(f"| {tokens} | {rule if tokens else '-'} | {per_step} | {steps} | {train.learning_rate:.3g} | {loss:.4f} "
              f"| {versus} | {result['train_s']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
