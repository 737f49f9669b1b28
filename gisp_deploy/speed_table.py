"""Measured decode speed-ups from a `gisp-deploy bench` results.json (`--speed-table`): the file is untrusted
input, checked field by field; speed-ups are interpolated between measured slices and never extrapolated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

MAX_TABLE_BYTES = 64 * 2**20  # a bench results.json of many slices is a few MB
SAME = 5e-7  # records round achieved sparsities to 6 digits: a slice this close to a measured one is that one


@dataclass(frozen=True)
class SpeedPoint:
    achieved_sparsity: float  # x of the interpolation: the slice that was measured, rounding included
    sparsity: float
    speedup: float  # median over rounds of dense TPOT / slice TPOT, timed in turns
    speedup_min: float
    speedup_max: float


@dataclass(frozen=True)
class SpeedTable:
    path: str
    batch_size: int
    points: tuple[SpeedPoint, ...]  # by achieved sparsity, the dense model first
    context: float  # mean tokens in each sequence's KV cache during the measured decode steps
    artifact: str  # the artifact the records name
    perplexity: tuple[tuple[str, int, float, float], ...]  # (text, seq_len, achieved sparsity, perplexity)
    warnings: tuple[str, ...]  # what the table's own records warn about at this batch size
    decoder_params: tuple[tuple[float, int], ...]  # (sparsity, decoder parameters its slice keeps): size records
    rounding: tuple[int, int]  # the (tp_size, channel_multiple) the measured slices were rounded to
    digest: str | None = None  # the measured artifact's manifest sha256, where results.json records it

    @property
    def source(self) -> str:
        return f"measured: {self.path}, batch {self.batch_size}, {len(self.points)} points"

    @property
    def measured_range(self) -> tuple[float, float]:
        return self.points[0].achieved_sparsity, self.points[-1].achieved_sparsity

    def at(self, achieved: float) -> float | None:
        """The speed-up at `achieved` sparsity, linear between the measured slices around it (None outside)."""
        pts = self.points
        if not pts[0].achieved_sparsity - SAME <= achieved <= pts[-1].achieved_sparsity + SAME:
            return None
        same = [p.speedup for p in pts if abs(p.achieved_sparsity - achieved) < SAME]
        if same:
            return same[0]
        for a, b in zip(pts, pts[1:]):
            if achieved <= b.achieved_sparsity:
                t = (achieved - a.achieved_sparsity) / (b.achieved_sparsity - a.achieved_sparsity)
                return a.speedup + t * (b.speedup - a.speedup)
        return pts[-1].speedup

    def reaching(self, target: float) -> list[tuple[float, float]]:
        """The achieved-sparsity intervals, in order, on which the interpolated speed-up is at least `target`."""
        out: list[tuple[float, float]] = []
        for a, b in zip(self.points, self.points[1:]):
            xa, xb, ya, yb = a.achieved_sparsity, b.achieved_sparsity, a.speedup, b.speedup
            if max(ya, yb) < target:
                continue
            cross = xa + (target - ya) / (yb - ya) * (xb - xa) if ya != yb else xa  # used only if it lies between
            lo, hi = (xa if ya >= target else cross), (xb if yb >= target else cross)
            if out and out[-1][1] >= lo - SAME:
                out[-1] = (out[-1][0], hi + SAME)
            else:
                out.append((lo - SAME, hi + SAME))
        return out

    def perplexity_at(self, achieved: float) -> dict[str, float]:
        """'text@seq_len' -> perplexity measured on the slice of this achieved sparsity (no interpolation)."""
        return {f"{t}@{n}": p for t, n, x, p in self.perplexity if abs(x - achieved) < SAME}


def read_speed_table(path, batch_size: int, artifact_path=None) -> SpeedTable:
    """The speed records of `path` (a bench results.json) at `batch_size`, of the artifact at `artifact_path`
    when the file measured several. Bad files are refused in one line that names the problem and the fix."""
    path = Path(path)
    fix = f"pass the results.json that `gisp-deploy bench ARTIFACT --speed --batch-sizes {batch_size}` wrote"
    if not path.is_file():
        raise ValueError(f"--speed-table {path}: no such file; {fix}")
    try:
        if path.stat().st_size > MAX_TABLE_BYTES:
            raise ValueError(f"--speed-table {path}: larger than {MAX_TABLE_BYTES >> 20} MiB, not a bench results.json")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--speed-table {path}: cannot be read as JSON ({type(e).__name__}); {fix}") from None
    records = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"--speed-table {path}: no 'results' list of records; {fix}")
    records = _records_of(records, path, artifact_path)
    speed = [r for r in records if r.get("measure") == "speed"]
    if not speed:
        raise ValueError(f"--speed-table {path}: no speed records (bench ran without --speed); {fix}")
    at_batch = [r for r in speed if r.get("batch_size") == batch_size]
    if not at_batch:
        sizes = sorted({r.get("batch_size") for r in speed if isinstance(r.get("batch_size"), int)})
        raise ValueError(f"--speed-table {path}: measured at batch sizes {', '.join(map(str, sizes))}, not "
                         f"--batch-size {batch_size}: pass one of those, or {fix}")
    points = sorted((_point(r, path) for r in at_batch), key=lambda p: p.achieved_sparsity)
    for a, b in zip(points, points[1:]):
        if b.achieved_sparsity - a.achieved_sparsity < 1e-9:
            raise ValueError(f"--speed-table {path}: two speed records of sparsity {a.sparsity:g} at batch "
                             f"{batch_size}; {fix}")
    if points[0].achieved_sparsity != 0:  # the dense model's speed-up over itself is 1 by definition
        points.insert(0, SpeedPoint(0.0, 0.0, 1.0, 1.0, 1.0))
    if len(points) < 2:
        raise ValueError(f"--speed-table {path}: only the dense model is measured at batch {batch_size}; measure "
                         f"slices too: gisp-deploy bench ARTIFACT --speed --sparsities 0.2,0.4 --batch-sizes "
                         f"{batch_size}")
    context = _number(at_batch[0].get("prompt_len"), path, "prompt_len") + \
        _number(at_batch[0].get("gen_len"), path, "gen_len") / 2
    warnings = tuple(f"sparsity {_number(r.get('sparsity'), path, 'sparsity'):g}: {w}" for r in at_batch
                     for w in (r.get("warnings") or []) if isinstance(w, str))
    falls = [f"{a.sparsity:g} -> {b.sparsity:g}" for a, b in zip(points, points[1:]) if b.speedup < a.speedup]
    if falls:
        warnings += (f"measured speed-ups fall from sparsity {', '.join(falls)} (noise, or a slower kernel): "
                     "the least pruned slice that reaches the target on the measured curve is chosen",)
    rounding = doc.get("speed") if isinstance(doc.get("speed"), dict) else {}
    digests = doc.get("artifact_digests") if isinstance(doc.get("artifact_digests"), dict) else {}
    digest = digests.get(str(records[0].get("artifact")))
    return SpeedTable(path=str(path), batch_size=batch_size, points=tuple(points), context=context,
                      artifact=str(records[0].get("artifact")), perplexity=_perplexities(records, path),
                      warnings=warnings, decoder_params=_sizes(records, path),
                      rounding=tuple(_whole(rounding.get(k, 1), path, k) for k in ("tp_size", "channel_multiple")),
                      digest=digest if isinstance(digest, str) else None)


def check_same_artifact(table: SpeedTable, ranking, digest: str | None = None) -> None:
    """Refuse a table of another artifact: by the manifest sha256 where both are known (`digest`: this
    artifact's), and always by the decoder parameters its measured slices kept against this ranking's."""
    from .plan import plan_slice

    if table.digest and digest and table.digest != digest:
        raise ValueError(f"--speed-table {table.path}: it measured the artifact with manifest sha256 "
                         f"{table.digest[:16]}…, this one's is {digest[:16]}…; bench this one")
    tp, cm = table.rounding
    for s, kept in table.decoder_params:
        try:
            mine = plan_slice(ranking, s, tp_size=tp, channel_multiple=cm).kept_params
        except ValueError:
            mine = None
        if mine != kept:
            raise ValueError(f"--speed-table {table.path}: its slice at sparsity {s:g} keeps {kept:,} decoder "
                             f"parameters, this artifact's {'none' if mine is None else f'{mine:,}'}: it measured "
                             f"another artifact ({table.artifact}); bench this one")


def _records_of(records: list[dict], path: Path, artifact_path) -> list[dict]:
    """The records of one artifact: the only one measured, or the one at `artifact_path`."""
    names = sorted({str(r.get("artifact")) for r in records})
    if len(names) == 1 or artifact_path is None:
        return records if len(names) == 1 else [r for r in records if str(r.get("artifact")) == names[0]]
    want = Path(artifact_path).resolve()
    mine = [n for n in names if Path(n).resolve() == want] or [n for n in names if Path(n).name == want.name]
    if len(mine) != 1:
        raise ValueError(f"--speed-table {path}: measures {', '.join(names)}, none of them {artifact_path}; "
                         "pass the results.json of a bench of this artifact")
    return [r for r in records if str(r.get("artifact")) == mine[0]]


def _number(value, path: Path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"--speed-table {path}: a record's {field!r} is {str(value)[:40]!r}, not a finite number; "
                         "pass a results.json that `gisp-deploy bench` wrote")
    return value


def _point(r: dict, path: Path) -> SpeedPoint:
    x, s = _number(r.get("achieved_sparsity"), path, "achieved_sparsity"), _number(r.get("sparsity"), path, "sparsity")
    speedup = _number(r.get("speedup"), path, "speedup")
    low, high = (_number(r.get(k, speedup), path, k) for k in ("speedup_min", "speedup_max"))
    if not (0 <= x < 1 and 0 <= s < 1 and 0 < low <= speedup <= high):
        raise ValueError(f"--speed-table {path}: a speed record has sparsity {s!r}, speed-up {speedup!r} "
                         f"({low!r}-{high!r}): out of range; pass a results.json that `gisp-deploy bench` wrote")
    return SpeedPoint(achieved_sparsity=x, sparsity=s, speedup=speedup, speedup_min=low, speedup_max=high)


def _whole(value, path: Path, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--speed-table {path}: {field!r} is {str(value)[:40]!r}, not a positive integer; pass a "
                         "results.json that `gisp-deploy bench` wrote")
    return value


def _sizes(records: list[dict], path: Path) -> tuple:
    return tuple((_number(r.get("sparsity"), path, "sparsity"), _whole(r.get("decoder_params"), path, "decoder_params"))
                 for r in records if r.get("measure") == "size")


def _perplexities(records: list[dict], path: Path) -> tuple:
    out = []
    for r in records:
        if r.get("measure") == "perplexity" and isinstance(r.get("text"), str) and isinstance(r.get("seq_len"), int):
            ppl = _number(r.get("perplexity"), path, "perplexity")
            out.append((r["text"][:64], r["seq_len"], _number(r.get("achieved_sparsity"), path, "achieved_sparsity"),
                        ppl))
    return tuple(out)
