"""The vLLM settings of a memory budget, computed without vLLM: the CPU KV cache in whole blocks, the GPU share,
and user options after -- that agree with the plan or are refused."""

import pytest

from gisp_deploy.budget import fit
from gisp_deploy.serving import settings as st
from gisp_deploy.serving.process import ServeError
from gisp_deploy.serving.settings import (VllmSettings, budget_settings, cpu_kv_cache_bytes, flag_value,
                                          gpu_memory_utilization, merged_args, vllm_int)

GiB = 2**30


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("tokens, seqs", [(1, 1), (256, 1), (256, 3), (300, 2), (8192, 4)])
def test_the_cpu_kv_cache_holds_every_sequence_in_whole_blocks_and_no_more(block, tokens, seqs):
    per_token = 4096
    size = cpu_kv_cache_bytes(per_token, tokens, seqs, block)
    blocks, rest = divmod(size, block * per_token)
    assert rest == 0
    per_seq = -(-tokens // block)
    usable = blocks - 1  # vLLM's null block
    assert usable >= seqs * per_seq and size >= per_token * tokens * seqs
    assert usable - 1 < seqs * per_seq  # one block fewer would not hold them all


def test_the_gpu_share_is_the_budget_over_the_device_and_a_budget_beyond_it_is_refused():
    assert gpu_memory_utilization(24 * GiB, [(70 * GiB, 80 * GiB)]) == 24 / 80
    share = gpu_memory_utilization(24 * GiB, [(40 * GiB, 40 * GiB), (80 * GiB, 80 * GiB)])
    assert share * 40 * GiB == 24 * GiB and share * 80 * GiB > 24 * GiB  # never less than the budget on any GPU
    with pytest.raises(ServeError, match=r"--fit-memory 90\.00 GiB is more than the GPU has \(80\.00 GiB\)"):
        gpu_memory_utilization(90 * GiB, [(80 * GiB, 80 * GiB)])
    with pytest.raises(ServeError, match=r"cuda:1 has only 10\.00 GiB of 80\.00 GiB free"):
        gpu_memory_utilization(24 * GiB, [(80 * GiB, 80 * GiB), (10 * GiB, 80 * GiB)])


def test_vllm_numbers_and_flags_read_as_vllm_reads_them():
    assert [vllm_int(t) for t in ("4096", "8k", "8K", "1.5m", "2G")] == [4096, 8000, 8192, 1_500_000, 2 * GiB]
    with pytest.raises(ValueError):
        vllm_int("auto")
    assert flag_value(["--max-model-len", "1", "--max-model-len=2"], "--max-model-len") == "2"  # the last wins
    assert flag_value(["--max-model-len-x", "1"], "--max-model-len") is None


def test_options_after_the_double_dash_agree_with_the_plan_or_are_refused():
    plan = VllmSettings(max_model_len=8192, max_num_seqs=4, dtype="float16", kv_cache_memory_bytes=3 * GiB)
    assert merged_args([], plan) == ["--max-model-len", "8192", "--max-num-seqs", "4", "--dtype", "float16",
                                     "--kv-cache-memory-bytes", str(3 * GiB)]
    same = ["--max-model-len", "8K", "--dtype=half", "--kv-cache-memory-bytes", "3G", "--enable-prefix-caching"]
    assert merged_args(same, plan) == ["--max-num-seqs", "4", *same]  # equal values are fine, not repeated
    for given, said in ((["--max-model-len", "4096"], "--max-model-len 4096 after -- contradicts the plan "
                                                      "(--max-model-len 8192)"),
                        (["--max-num-seqs=8"], "--max-num-seqs 8 after --"),
                        (["--dtype", "bfloat16"], "--dtype bfloat16 after --"),
                        (["--kv-cache-memory-bytes", "lots"], "--kv-cache-memory-bytes lots after --")):
        with pytest.raises(ServeError, match=said.replace("(", r"\(").replace(")", r"\)")):
            merged_args(given, plan)


@pytest.fixture(scope="module")
def planned(middle_budget):
    path, budget, options = middle_budget
    return fit(path, memory=budget, **options)


def test_a_cpu_plan_gives_vllm_the_planned_kv_cache_in_whole_blocks(planned, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert 0 < planned.cost.sparsity and planned.binding == "memory"
    got = budget_settings(planned, device="cpu", extra=[])
    per_token = planned.cost.kv_bytes_per_token
    assert got == VllmSettings(max_model_len=256, max_num_seqs=2, dtype="float32",
                               kv_cache_memory_bytes=(2 * 2 + 1) * 128 * per_token)
    assert got.kv_cache_memory_bytes >= planned.cost.kv_bytes
    small = budget_settings(planned, device="cpu", extra=["--block-size", "32"])
    assert small.kv_cache_memory_bytes == (2 * 8 + 1) * 32 * per_token
    with pytest.raises(ServeError, match="--block-size big after --: give a number of tokens"):
        budget_settings(planned, device="cpu", extra=["--block-size", "big"])
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    with pytest.raises(ServeError, match="VLLM_CPU_KVCACHE_SPACE=4 in the environment would replace"):
        budget_settings(planned, device="cpu", extra=[])


def test_a_gpu_plan_gives_vllm_the_budget_of_each_device(planned):
    budget = planned.settings["memory"]
    asked = []

    def memory_of(count):
        asked.append(count)
        return [(budget * 3, budget * 4)]

    got = budget_settings(planned, device="cuda", extra=[], memory_of=memory_of)
    assert asked == [1] and got.gpu_memory_utilization == 0.25 and got.kv_cache_memory_bytes is None
    assert got.args()[-2:] == ["--gpu-memory-utilization", "0.25"]
    with pytest.raises(ServeError, match="--kv-cache-memory-bytes after -- overrides the budget"):
        budget_settings(planned, device="cuda", extra=["--kv-cache-memory-bytes", "1G"], memory_of=memory_of)
    with pytest.raises(ServeError, match="more than the GPU has"):
        budget_settings(planned, device="cuda", extra=[], memory_of=lambda n: [(budget // 2, budget // 2)])


def test_without_a_gpu_the_gpu_memory_is_not_guessed(monkeypatch):
    monkeypatch.setattr(st.sys, "executable", "/bin/false")  # the child that reads torch.cuda fails
    with pytest.raises(ServeError, match="0 CUDA device"):
        st.cuda_memory(1)


def test_what_vllm_allocated_is_checked_against_the_plan():
    from gisp_deploy.serving.settings import capacity_line, kv_cache_blocks

    def metrics(blocks):
        return ("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
                f'vllm:cache_config_info{{block_size="128",cache_dtype="auto",engine="0",num_gpu_blocks="{blocks}",'
                'swap_space="0"} 1.0\nvllm:num_requests_running{engine="0"} 0.0\n')

    plan = VllmSettings(max_model_len=256, max_num_seqs=2)
    assert kv_cache_blocks(metrics(5)) == (5, 128) and kv_cache_blocks("vllm:other 1") is None
    assert capacity_line(metrics(5), plan) == ("  vLLM's KV cache: 5 blocks of 128 tokens: 2 sequences of 256 tokens "
                                               "at once (planned 2)")
    short = capacity_line(metrics(4), plan)  # the null block leaves 3: one sequence and a half
    assert short.startswith("warning:") and "1 sequences of 256 tokens" in short and "raise --reserve" in short
    assert capacity_line("", plan).startswith("warning: vLLM's /metrics does not say")
