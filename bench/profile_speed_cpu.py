"""Where a vLLM CPU decode step spends its time: dense vs a slice (torch profiler, self CPU time by op group).

    python bench/profile_speed_cpu.py SPARSITY CHANNEL_MULTIPLE   (0 1 = dense; needs bench/speed_cpu.py's checkpoint)

One engine in this process, batch 1, 16-token prompt, 32 new tokens, bf16; prints one JSON line: wall time,
profiled self CPU time, and the time in linear layers (oneDNN matmuls) and in attention / KV-cache ops.
Results of `for a in "0 1" "0.4 1" "0.4 64"; do python bench/profile_speed_cpu.py $a; done` are in
bench/results/speed_cpu/profile.jsonl.
"""
import os, sys, time, json, collections
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch
from vllm import LLM, SamplingParams
from gisp_deploy.artifact import load_artifact
from gisp_deploy.benchmark.speed import dense_model_dir
from gisp_deploy.serving.launch import vllm_overrides
from gisp_deploy.serving.process import staged_model_dir
from pathlib import Path
s = float(sys.argv[1]); cm = int(sys.argv[2])
art = load_artifact("/tmp/gisp-load-bench/random-1.5b-artifact")
staged = dense_model_dir(art) if s == 0 else staged_model_dir(Path(art.path))
kw = dict(model=staged.name, dtype="bfloat16", max_model_len=64, seed=0, skip_tokenizer_init=True,
          enable_prefix_caching=False, kv_cache_memory_bytes=1 << 28, max_num_seqs=1)
if s > 0:
    kw["hf_overrides"] = vllm_overrides(art, s, channel_multiple=cm)
llm = LLM(**kw)
p = [{"prompt_token_ids": list(range(100, 116))}]
sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, detokenize=False)
llm.generate(p, sp, use_tqdm=False)
t = time.perf_counter(); llm.generate(p, sp, use_tqdm=False); wall = time.perf_counter() - t
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    llm.generate(p, sp, use_tqdm=False)
groups = collections.Counter()
for e in prof.key_averages():
    n = e.key
    g = "linear" if ("onednn" in n or n in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")) else \
        "attention" if ("attn" in n or "attention" in n or "kv_cache" in n or "slot_mapping" in n) else None
    if g:
        groups[g] += e.self_cpu_time_total
total = sum(e.self_cpu_time_total for e in prof.key_averages())
top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
print(json.dumps({"sparsity": s, "channel_multiple": cm, "wall_s_32_tokens": wall,
                  "profiled_self_cpu_ms": total / 1e3, "groups_ms": {k: v / 1e3 for k, v in groups.items()},
                  "top": [(e.key, round(e.self_cpu_time_total / 1e3, 1), e.count) for e in top]}))
os._exit(0)
