"""lm-evaluation-harness, teacher and student side by side, offline.

Both models go through lm-eval's own HFLM (the model instances and one tokenizer) on the same
tasks with the same settings, so the two columns of the table differ only by the model. Two
small tasks ship with bcllm (data/lmeval_tasks/, documents beside their YAML, no Hub access):

    bcllm_ppl  loglikelihood_rolling over 30 English paragraphs written for bcllm (none of them
               calibration text): word_perplexity, byte_perplexity, bits_per_byte
    bcllm_mc   48 four-way questions written for bcllm (arithmetic, facts, common sense): acc,
               acc_norm; chance is 0.25

Any other lm-eval task name, or task YAML under `include_path`, works the same way (lm-eval's
own tasks need their datasets downloaded or in the Hugging Face datasets cache).

    result = lm_eval_side_by_side(model, student, tokenizer, ["bcllm_ppl", "bcllm_mc"], limit=20)
    print(format_table(result))
    result["tasks"]["bcllm_mc"]["student"]["acc"]

lm-eval is an optional extra (`pip install 'bcllm[lmeval]'`), imported only inside functions.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
from pathlib import Path

from ..errors import InputError, InputFileError

BUNDLED_TASKS_DIR = Path(__file__).parents[1] / "data" / "lmeval_tasks"
BUNDLED_TASKS = {"bcllm_ppl": "bcllm_ppl.jsonl", "bcllm_mc": "bcllm_mc.jsonl"}
INSTALL_HINT = "lm-eval is not installed: pip install 'bcllm[lmeval]'"


def require_lm_eval():
    """The lm_eval package, or an InputError that says how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 (HFLM; fails when a dependency is missing)
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return lm_eval


def parse_tasks(tasks) -> list[str]:
    """Task names from "a,b" or a list of names, in order, without repeats."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise InputError(f"tasks: give at least one task name, e.g. {','.join(BUNDLED_TASKS)}", "tasks")
    return names


def include_paths(include_path) -> list[Path]:
    """The bundled task folder first, then the user's folders (each must exist)."""
    given = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    folders = [Path(p).expanduser() for p in given]
    for folder in folders:
        if not folder.is_dir():
            raise InputFileError(f"include_path {str(folder)!r} is not a folder of lm-eval task YAML files",
                                 "include_path")
    return [BUNDLED_TASKS_DIR, *folders]


def task_manager(tasks: list[str], include_path=None):
    """An lm-eval TaskManager that knows every name in `tasks` (InputError naming the unknown ones).

    The bundled folder and `include_path` are indexed first; lm-eval's own ~15,000 task configs
    (about 7 s to index) only when a name is not found there."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    folders = [str(p) for p in include_paths(include_path)]
    with quiet_lm_eval():
        manager = TaskManager(include_path=folders, include_defaults=False)
        if unknown_tasks(manager, tasks):
            manager = TaskManager(include_path=folders)
    unknown = unknown_tasks(manager, tasks)
    if unknown:
        near = sorted({m for name in unknown for m in difflib.get_close_matches(name, manager.all_tasks, n=3)})
        raise InputError(f"tasks: unknown lm-eval task {', '.join(map(repr, unknown))}"
                         + (f" (close: {', '.join(near)})" if near else "")
                         + f"; bundled: {', '.join(BUNDLED_TASKS)}; others: any lm-eval task or group name, a task "
                         "YAML file, or a task defined in a folder given as include_path", "tasks")
    check_datasets(manager, tasks)
    return manager


def check_datasets(manager, tasks: list[str]) -> None:
    """Load each task once (its dataset included), so that a dataset neither downloaded nor in
    the Hugging Face datasets cache is one line before any model loads, not a traceback after."""
    for name in tasks:
        try:
            with quiet_lm_eval():
                manager.load([name])
        except (ConnectionError, FileNotFoundError) as e:
            raise InputError(f"tasks: the dataset of {name!r} is not available offline ({e}); download it first "
                             f"or use the bundled tasks {', '.join(BUNDLED_TASKS)}", "tasks") from None


def unknown_tasks(manager, tasks: list[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval logs a warning for every task and model passed as an instance (custom dataset,
    default aggregations, "pretrained is not a string"): expected here, so only errors show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_run_options(limit: int | None, batch_size: int) -> None:
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 (documents per task), got {limit}", "limit")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}", "batch_size")


def bundled_task_texts(tasks: list[str]) -> list[str]:
    """The evaluation text of the bundled tasks among `tasks` (for the calibration overlap check):
    each paragraph, and each question with its correct answer."""
    texts = []
    for name in tasks:
        if name not in BUNDLED_TASKS:
            continue
        for line in (BUNDLED_TASKS_DIR / BUNDLED_TASKS[name]).read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            texts.append(doc["text"] if "text" in doc else f"Question: {doc['question']} Answer: "
                         f"{doc['choices'][doc['answer']]}")
    return texts


def run_tasks(model, tokenizer, tasks: list[str], manager, *, limit=None, batch_size: int = 8,
              bootstrap_iters: int = 1000, max_length: int | None = None) -> dict:
    """lm-eval's simple_evaluate on one model instance (eval mode, no gradients), zero-shot."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    # HFLM sets a pad token on the tokenizer it gets when there is none: give it a copy.
    with quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, max_length=max_length)
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                       bootstrap_iters=bootstrap_iters, log_samples=True)


def task_metrics(results: dict) -> tuple[dict, dict]:
    """({metric: value}, {metric: stderr}) of one task's lm-eval results ("acc,none" -> "acc";
    a metric under another filter keeps it: "exact_match,strict-match")."""
    values, errors = {}, {}
    for key, value in results.items():
        if "," not in key:  # name, alias, sample_len
            continue
        metric, filt = key.split(",", 1)
        target = errors if metric.endswith("_stderr") else values
        name = metric.removesuffix("_stderr")
        name = name if filt == "none" else f"{name},{filt}"
        if isinstance(value, (int, float)):
            target[name] = float(value)
    return values, errors


def doc_scores(samples: list[dict]) -> list:
    """Per document in order: the loglikelihood (rolling tasks) or the list of the choices'
    loglikelihoods (multiple choice); None where the response is something else."""
    scores = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        resps = sample["filtered_resps"]
        if len(resps) == 1 and isinstance(resps[0], (int, float)):
            scores.append(float(resps[0]))
        elif resps and all(isinstance(r, (list, tuple)) and isinstance(r[0], (int, float)) for r in resps):
            scores.append([float(r[0]) for r in resps])
        else:
            scores.append(None)
    return scores


def same_choice(teacher_scores: list, student_scores: list) -> float | None:
    """Fraction of multiple-choice documents where both models rank the same choice first."""
    pairs = [(t, s) for t, s in zip(teacher_scores, student_scores) if isinstance(t, list) and isinstance(s, list)]
    if not pairs:
        return None
    return sum(max(range(len(t)), key=t.__getitem__) == max(range(len(s)), key=s.__getitem__) for t, s in pairs) / len(pairs)


def lm_eval_side_by_side(teacher, student, tokenizer, tasks, *, limit: int | None = None, batch_size: int = 8,
                         include_path=None, bootstrap_iters: int = 1000, max_length: int | None = None,
                         manager=None) -> dict:
    """Run lm-eval `tasks` (names, or "a,b") on teacher and student with the same settings.

    Returns {"tasks": {task: {"teacher": {metric: value}, "student": {...}, "teacher_stderr",
    "student_stderr", "higher_is_better", "samples", "version", "per_doc": {"teacher", "student"},
    "same_choice"}}, "limit", "lm_eval_version"}. limit: the first N documents of each task."""
    names = parse_tasks(tasks)
    check_run_options(limit, batch_size)
    manager = manager or task_manager(names, include_path)
    runs = {role: run_tasks(model, tokenizer, names, manager, limit=limit, batch_size=batch_size,
                            bootstrap_iters=bootstrap_iters, max_length=max_length)
            for role, model in (("teacher", teacher), ("student", student))}
    out = {}
    for task in runs["teacher"]["results"]:
        entry = {"samples": runs["teacher"].get("n-samples", {}).get(task),
                 "version": runs["teacher"].get("versions", {}).get(task),
                 "num_fewshot": runs["teacher"].get("n-shot", {}).get(task),
                 "higher_is_better": runs["teacher"].get("higher_is_better", {}).get(task, {})}
        for role, run in runs.items():
            entry[role], entry[f"{role}_stderr"] = task_metrics(run["results"][task])
        if task in runs["teacher"].get("samples", {}):
            entry["per_doc"] = {role: doc_scores(run["samples"][task]) for role, run in runs.items()}
            entry["same_choice"] = same_choice(entry["per_doc"]["teacher"], entry["per_doc"]["student"])
        out[task] = entry
    import lm_eval

    return {"tasks": out, "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}


def number(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def format_table(result: dict) -> str:
    """Teacher and student per task and metric, with the difference; stderr in brackets."""
    lines = [f"{'task':<14}{'metric':<18}{'teacher':>20}{'student':>20}{'student-teacher':>17}"]
    for task, entry in result["tasks"].items():
        for i, (metric, value) in enumerate(entry["teacher"].items()):
            cells = []
            for role in ("teacher", "student"):
                v, se = entry[role].get(metric), entry[f"{role}_stderr"].get(metric)
                cells.append(number(v) + (f" ({number(se)})" if se is not None else ""))
            student = entry["student"].get(metric)
            diff = number(student - value) if student is not None else "n/a"
            lines.append(f"{task if i == 0 else '':<14}{metric:<18}{cells[0]:>20}{cells[1]:>20}{diff:>17}")
        if entry.get("same_choice") is not None:
            lines.append(f"{'':<14}{'same_choice':<18}{'':>20}{number(entry['same_choice']):>20}")
    return "\n".join(lines)


def header_line(result: dict) -> str:
    """Which documents were scored: "lm-eval 0.4.13: bcllm_mc 20 of 48 documents (0-shot), ..."."""
    parts = []
    for task, entry in result["tasks"].items():
        n = entry.get("samples") or {}
        if n:
            parts.append(f"{task} {n['effective']} of {n['original']} documents ({entry.get('num_fewshot', 0)}-shot)")
    return f"lm-eval {result['lm_eval_version']}: " + ", ".join(parts)
