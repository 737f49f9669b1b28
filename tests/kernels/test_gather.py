"""Ragged row/column gathers (gisp_deploy.kernels.gather) are bit-exact with torch.index_select."""

import os
import subprocess
import sys

import pytest
import torch

from gisp_deploy import kernels
from gisp_deploy.kernels import gather as G

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same(outs, weights, keep, dim):
    assert len(outs) == len(weights)
    for o, w, k in zip(outs, weights, keep):
        ref = w.index_select(dim, k.to(w.device))
        assert o.shape == ref.shape and o.dtype == ref.dtype and o.device == ref.device
        assert o.is_contiguous()
        assert torch.equal(_bits(o), _bits(ref))


def _rand(shape, dtype, gen, device="cpu"):
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype).to(device)


def _sorted_subset(n, frac, gen):
    k = round(frac * n)
    return torch.randperm(n, generator=gen)[:k].sort().values


@pytest.fixture
def triton_interp():
    pytest.importorskip("triton")
    if not G.interpreting():
        pytest.skip("TRITON_INTERPRET=1 is not set")
    return True


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches (one per group in table mode)."""
    calls = []
    real = G._launch

    def spy(kind, ws, *a, **kw):
        calls.append((kind, len(ws)))
        return real(kind, ws, *a, **kw)

    monkeypatch.setattr(G, "_launch", spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64, torch.int8])
def test_rows_ragged_exact(triton_interp, launches, dtype):
    gen = torch.Generator().manual_seed(0)
    ws = [_rand((r, 13), dtype, gen) for r in (7, 1, 20, 5, 9)]
    keep = [torch.tensor([0, 2, 6]), torch.tensor([0]), torch.arange(20),
            torch.tensor([], dtype=torch.long), _sorted_subset(9, 0.6, gen)]
    _assert_same(G.gather_rows(ws, keep), ws, keep, 0)
    assert launches == [("rows", 5)]  # all layers in one launch


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64, torch.int8])
def test_cols_ragged_exact(triton_interp, launches, dtype):
    gen = torch.Generator().manual_seed(1)
    ws = [_rand((7, c), dtype, gen) for c in (13, 1, 300, 5, 40)]
    keep = [torch.tensor([0, 2, 12]), torch.tensor([0]), torch.arange(0, 300, 2),
            torch.tensor([], dtype=torch.long), torch.arange(40)]
    _assert_same(G.gather_cols(ws, keep), ws, keep, 1)
    assert launches == [("cols", 5)]


@pytest.mark.parametrize("block_k", [8, 16])
def test_cols_contiguous_runs(triton_interp, block_k):
    # Tiles whose kept columns are one contiguous run take the plain-copy path: aligned runs
    # (whole heads), misaligned runs, runs crossing tile ends, and a ragged tail.
    gen = torch.Generator().manual_seed(2)
    heads = torch.tensor([0, 2, 3])
    head_cols = (heads[:, None] * 16 + torch.arange(16)).reshape(-1)  # 48 cols of 4x16
    ws = [_rand((5, 64), torch.bfloat16, gen), _rand((3, 70), torch.float16, gen),
          _rand((6, 64), torch.bfloat16, gen), _rand((4, 37), torch.float32, gen)]
    keep = [head_cols, torch.arange(3, 3 + 40), torch.arange(64),
            torch.cat([torch.arange(1, 20), torch.tensor([25, 30, 36])])]
    out = G.gather_cols(ws, keep, block_r=4, block_k=block_k)
    _assert_same(out, ws, keep, 1)


def test_unsorted_and_repeated_indices(triton_interp):
    # Sorted input is the fast case, not a requirement: a tile whose indices merely span a
    # contiguous range (a permutation of it) must not be mistaken for a plain copy.
    gen = torch.Generator().manual_seed(12)
    ws = [_rand((6, 40), torch.bfloat16, gen) for _ in range(3)]
    perm = torch.arange(16)
    perm[[3, 4]] = perm[[4, 3]]
    keep = [perm, torch.tensor([5, 5, 1, 0, 39, 7, 7, 7]), torch.randperm(40, generator=gen)]
    _assert_same(G.gather_cols(ws, keep, block_r=4, block_k=8), ws, keep, 1)
    _assert_same(G.gather_cols(ws, keep), ws, keep, 1)
    wr = [w.t().contiguous() for w in ws]  # [40, 6]
    _assert_same(G.gather_rows(wr, keep), wr, keep, 0)


def test_rows_and_cols_all_or_nothing(triton_interp, launches):
    gen = torch.Generator().manual_seed(3)
    ws = [_rand((6, 10), torch.bfloat16, gen) for _ in range(3)]
    none = [torch.empty(0, dtype=torch.long)] * 3
    full = [torch.arange(6)] * 3
    _assert_same(G.gather_rows(ws, none), ws, none, 0)
    _assert_same(G.gather_rows(ws, full), ws, full, 0)
    fullc = [torch.arange(10)] * 3
    _assert_same(G.gather_cols(ws, none), ws, none, 1)
    _assert_same(G.gather_cols(ws, fullc), ws, fullc, 1)
    assert G.gather_rows([], []) == [] and G.gather_cols([], []) == []


def test_one_row_one_col_and_odd_sizes(triton_interp):
    gen = torch.Generator().manual_seed(4)
    w = _rand((1, 1), torch.float16, gen)
    k = torch.tensor([0])
    _assert_same(G.gather_rows([w], [k]), [w], [k], 0)
    _assert_same(G.gather_cols([w], [k]), [w], [k], 1)
    w = _rand((7, 13), torch.bfloat16, gen)
    kr, kc = torch.tensor([1, 3, 4, 6]), torch.tensor([0, 5, 6, 7, 12])
    _assert_same(G.gather_rows([w], [kr]), [w], [kr], 0)
    _assert_same(G.gather_cols([w], [kc]), [w], [kc], 1)


def test_mixed_groups_keep_order(triton_interp, launches):
    # Different column counts / dtypes in one call are grouped internally; order is preserved.
    gen = torch.Generator().manual_seed(5)
    ws = [_rand((8, 16), torch.bfloat16, gen), _rand((9, 24), torch.float32, gen),
          _rand((5, 16), torch.bfloat16, gen), _rand((4, 24), torch.float32, gen)]
    keep = [torch.tensor([1, 7]), torch.tensor([0, 4, 8]), torch.tensor([2]), torch.tensor([3])]
    _assert_same(G.gather_rows(ws, keep), ws, keep, 0)
    assert sorted(launches) == [("rows", 2), ("rows", 2)]
    wc = [w.t().contiguous() for w in ws]  # [C, R]: rows count differs per group
    _assert_same(G.gather_cols(wc, keep), wc, keep, 1)


def test_noncontiguous_unaligned_and_int32_indices(triton_interp):
    gen = torch.Generator().manual_seed(6)
    base = _rand((12, 15), torch.bfloat16, gen)
    ws = [base.t(), base[1:, 1:]]  # non-contiguous, and a view that starts off-alignment
    keep = [torch.tensor([0, 3, 14], dtype=torch.int32), torch.tensor([2, 10], dtype=torch.int32)]
    _assert_same(G.gather_rows(ws, keep), ws, keep, 0)
    keep = [torch.tensor([0, 11]), torch.tensor([1, 2, 3, 13])]
    _assert_same(G.gather_cols(ws, keep), ws, keep, 1)


def test_random_multilayer_parameters(triton_interp):
    gen = torch.Generator().manual_seed(7)
    ws = [_rand((48, 40), torch.bfloat16, gen).requires_grad_() for _ in range(6)]
    keep = [_sorted_subset(48, f, gen) for f in (0.6, 0.1, 0.9, 0.5, 0.6, 1.0)]
    outs = G.gather_rows(ws, keep)
    _assert_same(outs, [w.detach() for w in ws], keep, 0)
    p = torch.nn.Parameter(outs[0])  # usable as parameter data, own storage
    assert p.untyped_storage().data_ptr() != outs[1].untyped_storage().data_ptr()
    keepc = [_sorted_subset(40, 0.6, gen) for _ in ws]
    _assert_same(G.gather_cols(ws, keepc), [w.detach() for w in ws], keepc, 1)


def test_bad_inputs():
    w = torch.zeros(4, 5)
    with pytest.raises(ValueError):
        G.gather_rows([w], [])
    with pytest.raises(IndexError):
        G.gather_rows([w], [torch.tensor([4])])
    with pytest.raises(IndexError):
        G.gather_cols([w], [torch.tensor([-1])])
    with pytest.raises(TypeError):
        G.gather_cols([w], [torch.tensor([0.0])])


def test_host_index_table_checks_and_shares():
    cpu = torch.device("cpu")
    a, b, e = torch.tensor([5, 6]), torch.tensor([0, 1, 3]), torch.empty(0, dtype=torch.long)
    idx, offsets, is_sorted = G._indices_int32([a, e, b, a, b], [8, 8, 8, 8, 8], cpu, "row")
    assert idx.dtype == torch.int32 and idx.tolist() == [5, 6, 0, 1, 3]  # a tensor given twice is stored once
    assert offsets == [0, 2, 2, 0, 2] and is_sorted  # a step down between tensors does not count
    assert not G._indices_int32([a, torch.tensor([2, 1])], [8, 8], cpu, "row")[2]
    assert not G._indices_int32([torch.tensor([1, 1])], [8], cpu, "row")[2]  # repeats are not increasing
    with pytest.raises(IndexError, match="col index 9 out of range for size 9"):  # unsorted: every value checked
        G._indices_int32([a, torch.tensor([4, 9, 2])], [8, 9], cpu, "col")
    with pytest.raises(IndexError, match="row index 5 out of range for size 4"):  # shared: the smaller size counts
        G._indices_int32([b, a, a], [8, 8, 4], cpu, "row")
    assert G._indices_int32([e, e], [3, 3], cpu, "row")[0].numel() == 1  # nothing kept: a dummy entry


def test_torch_fallback_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(G, "_launch", lambda *a, **k: pytest.fail("triton launched on CPU"))
    gen = torch.Generator().manual_seed(8)
    ws = [_rand((7, 13), dt, gen) for dt in DTYPES]
    assert not G.use_triton(ws[0])
    keep = [torch.tensor([1, 5]), torch.tensor([], dtype=torch.long), torch.arange(7)]
    _assert_same(G.gather_rows(ws, keep), ws, keep, 0)
    keep = [torch.tensor([0, 12]), torch.arange(13), torch.tensor([3])]
    _assert_same(G.gather_cols(ws, keep), ws, keep, 1)


def test_use_triton_flag(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert G.use_triton(t) == G.HAS_TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert G.use_triton(t) is False
    monkeypatch.setattr(G, "HAS_TRITON", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert G.use_triton(t) is False
    assert kernels.gather_rows is G.gather_rows


def _gpu_checks():
    """Compiled-kernel checks on CUDA; run in a fresh process without TRITON_INTERPRET (Triton
    fixes parts of its interpreted/compiled mode when first imported)."""
    assert not G.interpreting() and torch.cuda.is_available()
    gen = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        ws = [_rand((r, 4096), dtype, gen, "cuda") for r in (1000, 37, 512, 1)]
        keep = [_sorted_subset(1000, 0.6, gen).cuda(), torch.arange(37).cuda(),
                torch.empty(0, dtype=torch.long).cuda(), torch.tensor([0]).cuda()]
        _assert_same(G.gather_rows(ws, keep), ws, keep, 0)
        _assert_same(G.gather_rows(ws, keep, flat=True), ws, keep, 0)
        wc = [_rand((300, c), dtype, gen, "cuda") for c in (1000, 517, 512, 8)]
        keep = [_sorted_subset(1000, 0.6, gen), _sorted_subset(517, 0.3, gen),
                (torch.tensor([1, 3, 6])[:, None] * 64 + torch.arange(64)).reshape(-1), torch.arange(8)]
        _assert_same(G.gather_cols(wc, keep), wc, keep, 1)
        _assert_same(G.gather_cols(wc, keep, flat=True), wc, keep, 1)
        w = _rand((33, 77), dtype, gen, "cuda")[1:, 3:]  # unaligned, non-contiguous
        k = torch.tensor([0, 5, 31])
        _assert_same(G.gather_rows([w], [k]), [w], [k], 0)
        _assert_same(G.gather_cols([w], [k]), [w], [k], 1)
    torch.cuda.synchronize()
    print("gpu checks passed")


def _compile_for(capability: int) -> dict:
    """Compile every specialization a GPU launch can use (pointer tables: per-layer launches happen only under
    the interpreter) for sm_`capability` (no GPU needed: Triton ships ptxas), with the 16-byte divisibility a
    launch gives aligned pointers and sizes; count 128-bit loads and stores."""
    import itertools
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(name, args, consts, divisible):
        names = list(args) + list(consts)
        src = ASTSource(fn=G._kernel(name), signature={**args, **{n: "constexpr" for n in consts}},
                        constexprs={(names.index(n),): v for n, v in consts.items()},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
        ptx = triton.compile(src, target=GPUTarget("cuda", capability, 32)).asm["ptx"]
        return {"v4_loads": ptx.count("ld.global.v4"), "v4_stores": ptx.count("st.global.v4")}

    ptrs = {"src_ptr": "*i16", "dst_ptr": "*i16", "idx_ptr": "*i32", "meta_ptr": "*i64"}
    out = {}
    for aligned in (True, False):
        out[f"rows aligned={aligned}"] = build(
            "rows", {**ptrs, "L": "i32", "C": "i32"},
            dict(COL_TILES=4, BLOCK_R=G.ROW_BLOCK_R, BLOCK_C=G.ROW_BLOCK_BYTES // 2, LOG2_P=5, USE_TABLE=True,
                 ALIGNED=aligned), list(ptrs) + (["C"] if aligned else []))
    for dst, src, srt in itertools.product([True, False], repeat=3):
        out[f"cols dst_aligned={dst} src_aligned={src} sorted={srt}"] = build(
            "cols", {**ptrs, "L": "i32", "R": "i32"},
            dict(BLOCK_R=G.COL_BLOCK_R, BLOCK_K=G.COL_BLOCK_K, LOG2_P=6, USE_TABLE=True, DST_ALIGNED=dst,
                 SRC_ALIGNED=src, VEC=8, SORTED=srt), list(ptrs))
    print(json.dumps(out))
    return out


@pytest.mark.parametrize("capability", [80, 90])  # A100; H100 / H200
def test_kernels_compile_for_gpus(tmp_path, capability):
    # The interpreter accepts code the compiler rejects; this compiles the kernels for real on the CPU, in a
    # fresh process without TRITON_INTERPRET, and checks that aligned tiles vectorize.
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, here] + [p for p in [env.get("PYTHONPATH")] if p])
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile now, not from an earlier run's cache
    res = subprocess.run([sys.executable, "-c", f"import test_gather as t; t._compile_for({capability})"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got) == 2 + 8
    for key, c in got.items():  # each side moves 16 bytes per access exactly where it is known aligned
        rows = key == "rows aligned=True"
        assert (c["v4_loads"] > 0) == (rows or "src_aligned=True" in key), (key, c)
        assert (c["v4_stores"] > 0) == (rows or "dst_aligned=True" in key), (key, c)


@pytest.mark.gpu
def test_gpu_compiled_exact():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, here] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-c", "import test_gather as t; t._gpu_checks()"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gpu checks passed" in res.stdout


@pytest.mark.gpu
def test_gpu_interpreter_per_layer(triton_interp):
    # Interpreter with CUDA tensors: one launch per layer (the interpreter copies arguments to
    # the host, so raw pointer tables cannot be used).
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(11)
    ws = [_rand((9, 24), torch.bfloat16, gen, "cuda") for _ in range(3)]
    keep = [torch.tensor([0, 8]), torch.tensor([], dtype=torch.long), torch.arange(9)]
    _assert_same(G.gather_rows(ws, keep), ws, keep, 0)
    keep = [torch.tensor([0, 23]), torch.arange(24), torch.tensor([5]).cuda()]
    _assert_same(G.gather_cols(ws, keep), ws, keep, 1)
    _assert_same(G.gather_cols(ws, keep, flat=True), ws, keep, 1)


def test_flat_outputs_are_views_of_one_buffer(triton_interp):
    gen = torch.Generator().manual_seed(10)
    ws = [_rand((r, 24), torch.bfloat16, gen) for r in (9, 4, 12)]
    keep = [torch.tensor([0, 8]), torch.tensor([], dtype=torch.long), torch.arange(12)]
    outs = G.gather_rows(ws, keep, flat=True)
    _assert_same(outs, ws, keep, 0)
    assert outs[0].untyped_storage().data_ptr() == outs[2].untyped_storage().data_ptr()
    keep = [torch.tensor([0, 23]), torch.arange(24), torch.tensor([5])]
    wc = [w[:4] for w in ws]
    _assert_same(G.gather_cols(wc, keep, flat=True), wc, keep, 1)
