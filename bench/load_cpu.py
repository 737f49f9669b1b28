"""CPU load of compact slices against the dense model, and the issue-18 goal checked directly.

    python bench/load_cpu.py [--out bench/results/load_cpu.json] [--work /tmp/gisp-load-bench]
        [--reference ARTIFACT] [--repeats 3] [--sparsities 0.2,0.4,0.5] [--cold] [--tokens 8] [--dtype native]

Four sources: the reference model's GISP artifact (--reference; bench/results/methods/artifact-gisp, made by
bench/methods_table.py), a locally written random-weight Llama checkpoint of about 1.5B parameters (bf16,
4 shards, under --work) with a random-method ranking (kept rows scattered: the layout's worst case), and each of
those two rewritten rank-ordered (NAME-ranked: `gisp-deploy reorder`; every slice a prefix of each tensor, mapped).

Every load runs in a fresh process of its own (so peaks do not mix), and "ready" is load + one forward pass of
--tokens tokens (lazily memory-mapped dense weights are read by that pass; on a CPU without fast bf16 matmuls its
compute can outweigh the bytes, and --tokens 1 still reads every weight). Loads alternate: for each sparsity, each repeat, a
dense load (transformers from_pretrained, memory-mapped) and then the slice (gisp_deploy.load), so each slice is
compared with the dense load next to it in time:

    dense bandwidth  = dense model bytes / dense ready time          (that pair's dense load)
    kept-bytes time  = slice model bytes / dense bandwidth
    ratio            = slice ready time / kept-bytes time             goal <= 1.1
    slice bandwidth  = slice model bytes / slice ready time           (what the slice achieved)
    peak anon        = peak RssAnon growth during the load (sampled every 2 ms by a thread in the child; VmHWM
                       growth, file pages included, is its upper bound)     goal <= slice bytes + staging buffer

    first-call cost  = first forward - a second one in the same process: what the first paid on top of the
                       compute, faulting in the mapped weights and setting up kernels (CPU matmul libraries set up
                       one per distinct weight shape; a slice's layers have many, counted in every record, a dense
                       model a few)

Medians over repeats with min-max spreads; a warning where repeats of one measurement differ by more than 25%,
and the machine's load average with every record. --cold drops the weight files from the page cache before
every load (posix_fadvise DONTNEED: works without root, for files nobody has mapped); by default the cache is
warm: before every load the weight files are read into it where mincore finds any page missing (this machine's
page cache was seen holding 600 MB of a 2.8 GB artifact just loaded five times), and every record gives the
resident fraction before and after (resident_before_warming, resident_at_load).
--dtype float32 (or bfloat16, float16) has both loaders convert to that dtype (from_pretrained(dtype=...),
gisp_deploy.load(dtype=...)); native, the default, loads each source in its own dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, threading, time
import torch
from gisp_deploy.slicing.loader import load
from gisp_deploy.artifact import load_artifact
from transformers import AutoModelForCausalLM
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
mode, path, s = sys.argv[1], sys.argv[2], float(sys.argv[3])
dtype = getattr(torch, sys.argv[4])
tokens = int(sys.argv[5])
art = load_artifact(path)
ids = torch.zeros(1, tokens, dtype=torch.long)
base, base_anon = status_mb("VmRSS"), status_mb("RssAnon")
peak_anon, done = [base_anon], threading.Event()
def sample():  # RssAnon has no peak counter: poll it
    while not done.wait(0.002):
        peak_anon[0] = max(peak_anon[0], status_mb("RssAnon"))
sampler = threading.Thread(target=sample, daemon=True)
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
    f.write("5")
sampler.start()
t = time.perf_counter()
if mode == "dense":
    model = AutoModelForCausalLM.from_pretrained(art.weights_dir, dtype=dtype)
else:
    model = load(art, s, dtype=dtype)
wall = time.perf_counter() - t
with torch.no_grad():
    model(ids)
ready = time.perf_counter() - t
done.set(); sampler.join()
t2 = time.perf_counter()
with torch.no_grad():
    model(ids)
second = time.perf_counter() - t2  # weights resident, every kernel set up by the first
shapes = {(tuple(m.weight.shape), m.weight.stride()) for m in model.modules() if isinstance(m, torch.nn.Linear)}
peak_anon[0] = max(peak_anon[0], status_mb("RssAnon"))
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_s": wall, "ready_s": ready, "forward_s": ready - wall, "second_forward_s": second,
                  "linear_shapes": len(shapes),
                  "peak_rss_growth_mb": status_mb("VmHWM") - base, "peak_anon_growth_mb": peak_anon[0] - base_anon,
                  "rss_anon_after_mb": status_mb("RssAnon") - base_anon, "rss_file_after_mb": status_mb("RssFile"),
                  "model_mb": nbytes / 2**20, "params": sum(p.numel() for p in model.parameters())}))
"""


def make_random_checkpoint(work: Path) -> Path:
    """~1.5B-parameter Llama (GQA) with random bf16 weights, written shard by shard, plus a random ranking."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from gisp_deploy.artifact import load_artifact, write_artifact
    from gisp_deploy.families import ModelShape
    from gisp_deploy.pruning.methods import PruneConfig, prune

    art = work / "random-1.5b-artifact"
    if art.exists():
        return art
    src = work / "random-1.5b"
    src.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=128, vocab_size=8192, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(src)
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (8192, 2048), "model.norm.weight": (2048,), "lm_head.weight": (8192, 2048)}
    for i in range(24):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (2048, 2048), p + "self_attn.k_proj.weight": (512, 2048),
                       p + "self_attn.v_proj.weight": (512, 2048), p + "self_attn.o_proj.weight": (2048, 2048),
                       p + "mlp.gate_proj.weight": (8192, 2048), p + "mlp.up_proj.weight": (8192, 2048),
                       p + "mlp.down_proj.weight": (2048, 8192), p + "input_layernorm.weight": (2048,),
                       p + "post_attention_layernorm.weight": (2048,)})
    names = list(shapes)
    shards = [names[k::4] for k in range(4)]
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-00004.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) if len(shapes[n]) == 2
                   else torch.ones(shapes[n], dtype=torch.bfloat16) for n in shard}
        total += sum(t.numel() for t in tensors.values())
        save_file(tensors, str(src / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        del tensors
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_parameters": total},
                                                                  "weight_map": weight_map}))
    shape = ModelShape.from_config(cfg)
    ranking = prune(None, shape, None, PruneConfig(method="random", max_sparsity=0.6, protect_first=0, protect_last=0))
    write_artifact(art, src, ranking, {"method": "random"}, copy_weights=False)
    load_artifact(art)
    return art


def ranked(art: Path, work: Path) -> Path:
    """`art` rewritten in the rank-ordered layout (gisp-deploy reorder) under `work`, once: the same slices,
    each one prefixes of the weights."""
    from gisp_deploy.pruning.reorder import reorder

    out = work / f"{art.name}-ranked"
    if not out.exists():
        reorder(art, out)
    return out


def drop_cached(art: Path) -> None:
    """Evict the artifact's weight files from the page cache (only pages nobody maps go)."""
    for f in _weight_files(art):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float | None:
    """The fraction of the files' pages in the page cache now (mincore on a fresh read-only mapping of each);
    None where libc has no mincore."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "mincore"):
        return None
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    have = total = 0
    for f in files:
        size = f.stat().st_size
        if not size:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {f}")
            try:
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec):
                    raise OSError(ctypes.get_errno(), f"mincore {f}")
                have += pages - vec.raw[:pages].count(0)  # the kernel sets only bit 0 (resident) of each byte
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return have / total if total else 1.0


def warm_cached(art: Path) -> tuple[float | None, float | None]:
    """Read the artifact's weight files into the page cache where any page of them is missing (this machine's
    page cache was seen to lose most of a 2.8 GB artifact between loads): the resident fraction before and
    after, so every "warm" record says how warm it was."""
    files = _weight_files(art)
    before = resident_fraction(files)
    if before is None or before >= 1.0:
        return before, before
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            at = 0
            while chunk := os.pread(fd, 8 << 20, at):
                at += len(chunk)
        finally:
            os.close(fd)
    return before, resident_fraction(files)


def _weight_files(art: Path) -> list[Path]:
    from gisp_deploy.artifact import load_artifact

    return sorted(Path(load_artifact(art, verify=False).weights_dir).glob("*.safetensors"))


def probe(mode: str, art: Path, s: float, dtype: str, cold: bool, tokens: int = 8) -> dict:
    if cold:
        drop_cached(art)
        resident = (None, resident_fraction(_weight_files(art)))
    else:
        resident = warm_cached(art)
    load_before = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(art), str(s), dtype, str(tokens)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"probe {mode} {art} {s} failed:\n{out.stderr[-2000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "loadavg_1m": [load_before, os.getloadavg()[0]],
            "resident_before_warming": resident[0], "resident_at_load": resident[1]}


def _commit() -> str:
    """The commit measured, with "+dirty" when the tree has uncommitted changes."""
    here = Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True)
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def spread(values: list[float]) -> dict:
    """Median, min and max, and whether repeats disagree by more than 25%."""
    lo, hi = min(values), max(values)
    return {"median": statistics.median(values), "min": lo, "max": hi, "n": len(values),
            "disagree": lo > 0 and hi / lo > 1.25}


def pair_record(dense: dict, sl: dict) -> dict:
    """One dense load and the slice load after it: the goal's numbers of that pair."""
    bw = dense["model_mb"] * 2**20 / dense["ready_s"]  # bytes / s of the dense path, this pair
    kept_s = sl["model_mb"] * 2**20 / bw
    return {"dense_bw_gb_s": bw / 1e9, "kept_bytes_s": kept_s, "ratio": sl["ready_s"] / kept_s,
            "slice_bw_gb_s": sl["model_mb"] * 2**20 / sl["ready_s"] / 1e9,
            "below_dense": sl["ready_s"] < dense["ready_s"]}


def summarize(name: str, s: float, pairs: list[tuple[dict, dict]], staging_mb: float) -> dict:
    recs = [pair_record(d, x) for d, x in pairs]
    slices = [x for _, x in pairs]
    model_mb = slices[0]["model_mb"]
    anon = spread([x["peak_anon_growth_mb"] for x in slices])
    ratio = spread([r["ratio"] for r in recs])
    return {"source": name, "sparsity": s, "kept_mb": model_mb, "dense_mb": pairs[0][0]["model_mb"],
            "dense_ready_s": spread([d["ready_s"] for d, _ in pairs]),
            "dense_bw_gb_s": spread([r["dense_bw_gb_s"] for r in recs]),
            "kept_bytes_s": spread([r["kept_bytes_s"] for r in recs]),
            "slice_bw_gb_s": spread([r["slice_bw_gb_s"] for r in recs]),
            "ready_s": spread([x["ready_s"] for x in slices]), "load_s": spread([x["load_s"] for x in slices]),
            "forward_s": spread([x["forward_s"] for x in slices]), "ratio": ratio,
            "first_call_s": spread([x["forward_s"] - x["second_forward_s"] for x in slices]),
            "dense_first_call_s": spread([d["forward_s"] - d["second_forward_s"] for d, _ in pairs]),
            "linear_shapes": slices[0]["linear_shapes"], "dense_linear_shapes": pairs[0][0]["linear_shapes"],
            "ratio_goal_met": ratio["median"] <= 1.1,
            "below_dense_pairs": sum(r["below_dense"] for r in recs),
            "peak_anon_growth_mb": anon,
            "peak_rss_growth_mb": spread([x["peak_rss_growth_mb"] for x in slices]),
            "anon_bound_mb": model_mb + staging_mb, "anon_goal_met": anon["max"] <= model_mb + staging_mb,
            "resident_at_load_min": min((r["resident_at_load"] for pair in pairs for r in pair
                                         if r.get("resident_at_load") is not None), default=None)}


def _cached_note(*records) -> str:
    """How much of the weight files was in the page cache before each load of a pair (dense, slice) was warmed."""
    seen = [r.get("resident_before_warming") for r in records]
    return "" if None in seen else ", cached before warming " + " / ".join(f"{100 * f:.0f}%" for f in seen)


def main():
    from gisp_deploy import safetensors_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_cpu.json"))
    ap.add_argument("--work", default="/tmp/gisp-load-bench")
    ap.add_argument("--reference", default=str(ROOT / "bench" / "results" / "methods" / "artifact-gisp"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sparsities", default="0.2,0.4,0.5")
    ap.add_argument("--sources", default="reference,reference-ranked,random-1.5b,random-1.5b-ranked")
    ap.add_argument("--cold", action="store_true", help="drop the weight files from the page cache before each load")
    ap.add_argument("--tokens", type=int, default=8, help="tokens of the first forward pass (1 still reads every "
                    "weight; where bf16 matmuls are slow, fewer tokens leave the bytes, not the compute, to measure)")
    ap.add_argument("--dtype", default="native", choices=("native", "float32", "bfloat16", "float16"),
                    help="the dtype both loaders give (native: each source's own, no conversion)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    known = {"reference": ("tiny-llama-gqa-19m (gisp)", lambda: Path(args.reference), "float32"),
             "random-1.5b": ("random Llama 1.5B (bf16)", lambda: make_random_checkpoint(work), "bfloat16")}
    for key, (name, where, dtype) in list(known.items()):  # NAME-ranked: NAME's artifact, rank-ordered
        known[f"{key}-ranked"] = (f"{name}, rank-ordered", lambda where=where: ranked(where(), work), dtype)
    staging_mb = getattr(safetensors_file, "STAGING_BYTES", 0) / 2**20  # 0: code before the staging buffer
    rows, summary = [], []
    for key in args.sources.split(","):
        name, where, dtype = known[key]
        dtype = dtype if args.dtype == "native" else args.dtype
        art = where()
        probe("compact", art, sparsities[0], dtype, False, args.tokens)  # warm the page cache (and the verification record)
        probe("dense", art, 0.0, dtype, False, args.tokens)
        mapped = probe("compact", art, 0.0, dtype, args.cold, args.tokens)  # sparsity 0: memory-mapped like the dense path
        rows.append({"source": name, "loader": "gisp load (mapped)", "sparsity": 0.0, "dtype": dtype, **mapped})
        for s in sparsities:
            pairs = []
            for rep in range(args.repeats):
                d, x = (probe("dense", art, 0.0, dtype, args.cold, args.tokens),
                        probe("compact", art, s, dtype, args.cold, args.tokens))
                pairs.append((d, x))
                for loader, r in (("transformers from_pretrained (dense)", d), ("gisp load", x)):
                    rows.append({"source": name, "loader": loader, "sparsity": 0.0 if r is d else s, "pair_of": s,
                                 "repeat": rep, "dtype": dtype, **r})
                rec = pair_record(d, x)
                print(f"{name:26s} s={s:<4} #{rep}: dense ready {d['ready_s']:5.2f} s ({rec['dense_bw_gb_s']:5.2f} "
                      f"GB/s), slice ready {x['ready_s']:5.2f} s (load {x['load_s']:5.2f}; {rec['slice_bw_gb_s']:5.2f} GB/s), "
                      f"kept-bytes time "
                      f"{rec['kept_bytes_s']:5.2f} s, ratio {rec['ratio']:4.2f}, peak anon +"
                      f"{x['peak_anon_growth_mb']:6.0f} MB (slice {x['model_mb']:6.0f} MB), load avg "
                      f"{x['loadavg_1m'][1]:.1f}{_cached_note(d, x)}", flush=True)
            summary.append({**summarize(name, s, pairs, staging_mb), "dtype": dtype})
    cmd = "python bench/load_cpu.py " + " ".join(sys.argv[1:])
    note = ("warm page cache" if not args.cold else "cold: weight files evicted (posix_fadvise) before each load") + \
        f"; {os.cpu_count()} CPUs ({_cpu_model()}) shared with other jobs (load average in every record); staging buffer " \
        f"{staging_mb:.0f} MiB; first forward of {args.tokens} tokens; dtype {args.dtype}"
    Path(args.out).write_text(json.dumps({"command": cmd, "commit": _commit(), "note": note, "summary": summary,
                                          "results": rows}, indent=2))
    print("\n| source | sparsity | kept MB | dense ready s | dense GB/s | kept-bytes s | slice ready s | slice GB/s "
          "| ratio (goal <= 1.1) | peak anon MB (goal <= kept + staging) | first forward - second, s: slice / dense "
          "(distinct linear shapes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        def f(m, digits=2):
            return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}-{m['max']:.{digits}f}){' !' if m['disagree'] else ''}"
        print(f"| {r['source']} | {r['sparsity']} | {r['kept_mb']:.0f} | {f(r['dense_ready_s'])} | "
              f"{f(r['dense_bw_gb_s'])} | {f(r['kept_bytes_s'])} | {f(r['ready_s'])} | {f(r['slice_bw_gb_s'])} | "
              f"{f(r['ratio'])} "
              f"{'ok' if r['ratio_goal_met'] else 'MISSED'} | {f(r['peak_anon_growth_mb'], 0)} <= "
              f"{r['anon_bound_mb']:.0f} {'ok' if r['anon_goal_met'] else 'MISSED'} | "
              f"{r['first_call_s']['median']:.2f} / {r['dense_first_call_s']['median']:.2f} "
              f"({r['linear_shapes']} / {r['dense_linear_shapes']}) |")
    print("(median (min-max) over repeats; ! = repeats differ by more than 25%)")


if __name__ == "__main__":
    main()
