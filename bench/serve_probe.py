"""GPU probe: static vs continuous batcher on the Llama-3.2-1B architecture (random bf16 weights)."""
import os, sys, time, threading, statistics, json
from types import SimpleNamespace
sys.path.insert(0, os.getcwd())
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
from serve.engine import Batcher, ContinuousBatcher, Job
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(0), flush=True)
cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, bos_token_id=128000, eos_token_id=[128001, 128009])
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
print("attn", model.config._attn_implementation, flush=True)
fmt = SimpleNamespace(stop_ids=(128009, 128001), pad_id=128004)
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(1000, 100000, (60 + i % 7,), generator=g).tolist() for i in range(96)]
N = 128
def level(b, conc, count, offset):
    lat, toks, outs = [], [], {}
    lock = threading.Lock(); todo = list(range(offset, offset + count))
    def client():
        while True:
            with lock:
                if not todo: return
                i = todo.pop(0)
            j = Job(prompts[i], N, 0.0); t = time.perf_counter(); b.submit([j], timeout_s=300)
            with lock: lat.append(time.perf_counter() - t); toks.append(len(j.tokens)); outs[i] = j.tokens
    t = time.perf_counter(); th = [threading.Thread(target=client) for _ in range(conc)]
    [x.start() for x in th]; [x.join() for x in th]; wall = time.perf_counter() - t
    lat.sort(); p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return {"conc": conc, "tok_s": round(sum(toks) / wall, 1), "p50": round(statistics.median(lat), 3), "p95": round(p95, 3), "wall": round(wall, 2)}, outs
results = {}
variants = [("static", None), ("cont-graphs-auto", "auto"), ("cont-graphs-off", "off")]
if len(sys.argv) > 1: variants = [v for v in variants if v[0] in sys.argv[1].split(",")]
for name, graphs in variants:
    t = time.perf_counter()
    if graphs is None:
        b = Batcher(model, 32, 5, fmt, max_pending=64, timeout_s=300, stall_s=300)
    else:
        b = ContinuousBatcher(model, 32, 5, fmt, max_pending=64, timeout_s=300, stall_s=300, max_request_tokens=512, cuda_graphs=graphs)
        print(name, "cb_config", {k: getattr(b.cb_config, k, None) for k in ("use_cuda_graph", "use_async_batching", "max_batch_tokens", "num_blocks")}, flush=True)
    w = Job(prompts[0], 4, 0.0); b.submit([w], timeout_s=600)
    print(name, "init+warmup s", round(time.perf_counter() - t, 1), flush=True)
    rows = []; allouts = {}
    for conc, count in ((1, 3), (8, 16), (32, 64)):
        r, outs = level(b, conc, count, 0); rows.append(r); allouts[conc] = outs
        if graphs is not None: r["steps"] = b._step_counter()
        print(name, r, flush=True)
    same = sum(allouts[32][i] == allouts[1][i] for i in allouts[1]); print(name, "c1 vs c32 identical", same, "/", len(allouts[1]), flush=True)
    results[name] = (rows, {i: allouts[32][i] for i in range(8)})
    b.close(); del b; torch.cuda.empty_cache()
if "static" in results:
    for name in results:
        if name != "static":
            s = results["static"][1]; c = results[name][1]
            print(name, "vs static token-identical on first 8 prompts:", sum(s[i] == c[i] for i in s), "/ 8", flush=True)
