"""Standard benchmarks through lm-eval: its task index and its HF wrapper on the compact model, as flat records."""

from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MISSING = "lm-eval tasks need lm-eval: pip install 'lm-eval>=0.4.13'"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # `datasets` builders over local files
# what HFLM says of any model passed as an object, as here on purpose
EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


@dataclass
class LmEvalTasks:
    """lm-eval tasks resolved and their data read, ready for any number of models."""
    manager: object  # lm_eval.tasks.TaskManager
    items: list  # the Task / Group objects lm_eval.simple_evaluate runs
    names: list[str]


def split_tasks(tasks) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (blank items dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    return [t.strip() for t in items if t.strip()]


def check_options(limit=None, num_fewshot=None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"lm-eval limit {limit!r}: give a number of items >= 1 (or none for every item)")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot {num_fewshot!r}: give a number of examples >= 0")


def _task_manager_class():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(MISSING) from None
    return TaskManager


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _read_yaml(spec: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader: `include:` merged, no code run

    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"{spec}: no such lm-eval task YAML file")
    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file: say which and why
        raise ValueError(f"{spec}: not a readable lm-eval task YAML ({type(e).__name__}: {e})") from None
    if not isinstance(_yaml_name(cfg), str):
        raise ValueError(f"{spec}: an lm-eval task YAML names its task (`task: NAME`) or group (`group: NAME`)")
    return cfg


def _yaml_name(cfg: dict):
    return cfg.get("group") if "group" in cfg else cfg.get("task")


def _local_files_exist(name: str, cfg: dict) -> None:
    """A task over local files (dataset_path json/csv/...): every data file exists, read as lm-eval reads it
    (relative to the working directory)."""
    if cfg.get("dataset_path") not in LOCAL_BUILDERS:
        return
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    values = files.values() if isinstance(files, dict) else [files]
    for v in values:
        for f in v if isinstance(v, list) else [v]:
            if isinstance(f, str) and "://" not in f and not any(c in f for c in "*?[") and not Path(f).is_file():
                raise ValueError(f"lm-eval task {name!r}: data file {f} not found (lm-eval reads data_files "
                                 f"relative to the working directory, {Path.cwd()}): run from there or give an "
                                 "absolute path")


def prepare_tasks(tasks, *, include_path=None) -> LmEvalTasks:
    """Resolve every task — a name in lm-eval's index, or a path to a task YAML — and read its data, before any
    model is loaded: an unknown name, a missing file or data that cannot be reached is one ValueError."""
    TaskManager = _task_manager_class()
    specs = split_tasks(tasks)
    if not specs:
        raise ValueError("no lm-eval task given: name one (e.g. hellaswag,arc_easy) or a task YAML file")
    includes = [Path(p).expanduser() for p in ([include_path] if isinstance(include_path, (str, Path))
                                                else include_path or [])]
    for p in includes:
        if not p.is_dir():
            raise ValueError(f"lm-eval include path {p}: no such folder of task YAML files")
    yamls = {s: _read_yaml(s) for s in specs if _is_yaml(s)}
    # a group YAML names its tasks: lm-eval finds them in its own index and the YAML's folder, loaded by name
    group_dirs = [Path(s).expanduser().resolve().parent for s, c in yamls.items() if "group" in c]
    includes += [d for d in dict.fromkeys(group_dirs) if d not in includes]
    # lm-eval's own index (thousands of YAML files, seconds to read) only when a task is named or a group needs it
    defaults = any(s not in yamls for s in specs) or bool(group_dirs)
    manager = TaskManager(include_path=[str(p) for p in includes] or None, include_defaults=defaults)
    index = manager.task_index
    items, names = [], []
    for spec in specs:
        if spec in yamls:
            cfg, name = yamls[spec], _yaml_name(yamls[spec])
            load_as = name if "group" in cfg else str(Path(spec).expanduser().resolve())
        elif spec in index:
            cfg, name, load_as = index[spec].cfg or {}, spec, spec
        else:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown lm-eval task {spec!r}{hint} (`lm-eval ls tasks` lists them; a local task "
                             "is a path to its .yaml file)")
        _local_files_exist(name, cfg)
        loaded = _load(manager, load_as, name, cfg)
        groups = loaded.get("groups", {})
        items += [groups[name]] if name in groups else list(loaded["tasks"].values())
        names.append(name)
    return LmEvalTasks(manager, items, names)


def _load(manager, spec: str, name: str, cfg: dict) -> dict:
    """manager.load([spec]), which reads the task's data; its failures as one line naming the task."""
    try:
        return manager.load([spec])
    except ConnectionError as e:
        where = cfg.get("dataset_path") or "its dataset"
        raise ValueError(f"lm-eval task {name!r} reads {where} from the Hugging Face Hub, which could not be reached "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): it needs network access or "
                         "the dataset in the Hugging Face cache (HF_DATASETS_CACHE); offline, run a local task "
                         "YAML over a JSONL file instead (see examples/lm-eval/)") from None
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; the user needs the task and why
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"lm-eval task {name!r} could not be loaded: {type(e).__name__}: {first}") from None


def run_lm_eval(model, tokenizer, tasks, *, batch_size: int = 16, device=None, limit: int | None = None,
                num_fewshot: int | None = None, include_path=None) -> list[dict]:
    """lm-eval's evaluation of an already-loaded model, wrapped in lm-eval's own HFLM: one record per (task,
    metric), with lm-eval's standard error. `tasks`: names / YAML paths (resolved here) or a prepared
    LmEvalTasks (resolved once for many models); `limit`: the first N items of each task."""
    check_options(limit, num_fewshot)
    prepared = tasks if isinstance(tasks, LmEvalTasks) else prepare_tasks(tasks, include_path=include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet(logging.getLogger("lm_eval.models.huggingface")):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
                  trust_remote_code=False, device=str(device) if device is not None else None)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(prepared.items), task_manager=prepared.manager,
                                      num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                      log_samples=False)
    return lm_eval_records(results)


@contextmanager
def _quiet(logger):
    """Drop the EXPECTED_WARNINGS `logger` would print; everything else passes."""
    drop = logging.Filter()
    drop.filter = lambda record: not record.getMessage().startswith(EXPECTED_WARNINGS)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def lm_eval_records(results: dict) -> list[dict]:
    """simple_evaluate's results -> flat `lm_eval` records (README, "Measurement records"): lm-eval's metric keys
    "acc,none" / "acc_stderr,none" become metric "acc", filter "none", value and stderr (None where lm-eval
    has none)."""
    samples, subtasks = results.get("n-samples", {}), results.get("group_subtasks", {})
    shots = results.get("n-shot", {})

    def items(name):
        if name in samples:
            return samples[name]["effective"]
        return sum(items(s) or 0 for s in subtasks.get(name, [])) or None

    version = results.get("lm_eval_version")
    records = []
    for name, res in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            stderr = res.get(f"{metric}_stderr,{filt}")
            records.append({"measure": "lm_eval", "task": name, "metric": metric, "filter": filt, "value": float(value),
                            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                            "items": items(name), "num_fewshot": shots.get(name), "lm_eval_version": version})
    return records
