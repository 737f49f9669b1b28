"""Speed timing logic: per-run times from one run's own step timestamps, spreads, warnings, repeat-until-stable."""

from types import SimpleNamespace

import pytest

from gisp_deploy.benchmark.speed import (SpeedConfig, SpeedError, disagreement_warnings, ideal_warning, measure,
                                         spread, timed_generation)


class SteppingEngine:
    """vLLM's LLMEngine surface that timed_generation uses: every step gives each sequence one more token and
    advances a fake clock by the prefill or decode time."""

    def __init__(self, clock, prefill_s=0.5, decode_s=0.1):
        self.clock, self.prefill_s, self.decode_s, self.reqs = clock, prefill_s, decode_s, {}

    def add_request(self, rid, prompt, params):
        self.reqs[rid] = [0, params.max_tokens]

    def has_unfinished_requests(self):
        return any(n < want for n, want in self.reqs.values())

    def step(self):
        first = all(n == 0 for n, _ in self.reqs.values())
        self.clock.now += self.prefill_s if first else self.decode_s
        outs = []
        for rid, st in self.reqs.items():
            if st[0] < st[1]:
                st[0] += 1
                outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=list(range(st[0])))]))
        return outs


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_times_come_from_the_runs_own_step_timestamps():
    clock = Clock()
    engine = SteppingEngine(clock, prefill_s=0.5, decode_s=0.1)
    t = timed_generation(engine, [{"prompt_token_ids": [1, 2]}] * 3, SimpleNamespace(max_tokens=5), clock=clock)
    assert t["ttft_s"] == pytest.approx(0.5)
    assert t["tpot_s"] == pytest.approx(0.1)  # 4 decode steps between the first and the fifth token
    assert t["total_s"] == pytest.approx(0.9)


def test_a_run_that_returns_too_few_tokens_is_an_error():
    clock = Clock()
    engine = SteppingEngine(clock)
    engine.add_request = lambda rid, prompt, params: engine.reqs.__setitem__(rid, [0, params.max_tokens - 1])
    with pytest.raises(SpeedError, match="expected 5 tokens"):
        timed_generation(engine, [{"prompt_token_ids": [1]}], SimpleNamespace(max_tokens=5), clock=clock)


class ScriptedEngine:
    """An engine whose runs take the given times per output token, in order (the last one repeats)."""

    def __init__(self, tpots):
        self.tpots, self.calls = list(tpots), 0

    def run(self, batch_size):
        t = self.tpots[min(self.calls, len(self.tpots) - 1)]
        self.calls += 1
        return {"ttft_s": 2 * t, "tpot_s": t, "total_s": 2 * t + 9 * t, "threads": 2}


def test_the_speed_up_is_the_median_of_same_round_ratios():
    # the machine slows down by 3x during the measurement: a ratio of medians taken apart would say 0.6x or 5x;
    # each round times both engines back to back, so the ratio is the true 1.5x in every round
    dense = ScriptedEngine([0.3, 0.3, 0.6, 0.9, 0.3])   # warm-up, then three rounds
    slice_ = ScriptedEngine([0.2, 0.2, 0.4, 0.6, 0.2])
    cfg = SpeedConfig(repeats=3, tolerance=0.1)
    row = measure(dense, slice_, cfg, batch_size=1)
    assert row["speedup"] == pytest.approx(1.5) and row["speedup_min"] == pytest.approx(1.5)
    assert (row["tpot_s_min"], row["tpot_s"], row["tpot_s_max"]) == pytest.approx((0.2, 0.4, 0.6))
    assert row["tpot_runs_s"] == pytest.approx([0.2, 0.4, 0.6]) and row["repeats"] == 3
    assert dense.calls == slice_.calls == 4  # one warm-up each, not counted
    assert any("time per output token spans" in w for w in row["warnings"])  # the load did change: said so
    assert not any("speed-up spans" in w for w in row["warnings"])


def test_steady_runs_give_no_warning():
    row = measure(ScriptedEngine([0.3]), ScriptedEngine([0.2]), SpeedConfig(repeats=3), batch_size=4)
    assert row["warnings"] == [] and row["speedup"] == pytest.approx(1.5)
    assert ideal_warning(row, ideal=1.6, cfg=SpeedConfig()) is None


def test_a_speed_up_beyond_its_ideal_bound_is_flagged():
    row = measure(ScriptedEngine([0.3]), ScriptedEngine([0.1]), SpeedConfig(repeats=3), batch_size=1)
    assert "beats its ideal bound" in ideal_warning(row, ideal=1.45, cfg=SpeedConfig())
    assert ideal_warning(row, ideal=2.9, cfg=SpeedConfig()) is None  # within the 10% tolerance


def test_until_stable_adds_rounds_until_the_last_repeats_agree():
    noisy_then_steady = [0.3, 0.3, 0.9, 0.2, 0.3, 0.3, 0.3]
    dense, slice_ = ScriptedEngine(noisy_then_steady), ScriptedEngine([0.2])
    row = measure(dense, slice_, SpeedConfig(repeats=3, until_stable=True, max_repeats=10), batch_size=1)
    assert row["repeats"] == 6 and row["warnings"] == []


def test_until_stable_gives_up_saying_so():
    alternating = [0.3, 0.3, 0.9] * 10
    row = measure(ScriptedEngine(alternating), ScriptedEngine([0.2]),
                  SpeedConfig(repeats=3, until_stable=True, max_repeats=5), batch_size=1)
    assert row["repeats"] == 5 and any("not stable after 5 rounds" in w for w in row["warnings"])


def test_spread_and_disagreement():
    assert spread([1.0, 2.0, 4.0]) == {"min": 1.0, "median": 2.0, "max": 4.0, "rel": 1.5}
    rounds = [{"tpot_s": t} for t in (0.10, 0.104, 0.108)]
    assert disagreement_warnings(rounds, SpeedConfig(tolerance=0.1)) == []
    assert disagreement_warnings(rounds, SpeedConfig(tolerance=0.05))


@pytest.mark.parametrize("kwargs, message", [({"tolerance": 0}, "--tolerance"), ({"tolerance": 1.5}, "--tolerance"),
                                             ({"until_stable": True, "max_repeats": 2}, "--max-repeats")])
def test_bad_speed_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeedConfig(**kwargs)
