"""One call per command: build a student and measure it against its original.

    from bcllm import StudentSpec, evaluate_student
    record = evaluate_student("smollm2-135m", StudentSpec(layers="10-19", fit="block"), max_new_tokens=0)
    record["metrics"]["kl_mean"], record["metrics"]["kl_recovered"]

returns what `bcllm eval --json` writes (floor included), less the command line's own options;
`generate_side_by_side` is `bcllm generate`.
"""

from __future__ import annotations

import time

import torch

from ..errors import InputError
from ..fit.student import StudentIO, StudentSpec, build_student, config_for
from ..io.models import load_model, model_file_identity
from ..io.prompts import context_length, default_prompts_path, load_prompts, tokenize_prompts
from ..io.results import versions
from ..ops import kernel
from .metrics import TeacherCache, common_prefix_length, eos_token_ids, evaluate, greedy_generate, measure_floor, with_floor
from .streaming import Streamer, check_streamable, evaluate_streamed, fit_streamed_


def _model(model_id_or_model, dtype, device):
    """(model, tokenizer, model_id) from a model string, or from a (model, tokenizer) pair."""
    if isinstance(model_id_or_model, str):
        return (*load_model(model_id_or_model, dtype=dtype, device=device), model_id_or_model)
    model, tokenizer = model_id_or_model
    return model, tokenizer, ""


def evaluate_in_memory(model_id_or_model, spec: StudentSpec, io: StudentIO, prompts: list[str], *,
                       max_new_tokens: int, chat: bool, seed: int, dtype: str, device: str) -> tuple[dict, dict, dict]:
    """(result, summary, timing) with the whole model in memory: student, teacher cache, floor, metrics."""
    start = time.perf_counter()
    model, tokenizer, model_id = _model(model_id_or_model, dtype, device)
    t_load = time.perf_counter()
    student, summary = build_student(model, tokenizer, spec, io, eval_prompts=prompts, model_id=model_id)
    t_student = time.perf_counter()
    teacher = TeacherCache.build(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat,
                                 model_id=model_file_identity(model_id) if model_id else None)
    t_teacher = time.perf_counter()
    floor = measure_floor(model, summary["modules"], tokenizer, prompts, teacher)
    del model  # from here on only the student is held
    t_floor = time.perf_counter()
    result = evaluate(student, tokenizer, prompts, teacher=teacher, seed=seed)
    result["metrics"] = with_floor(result["metrics"], floor)
    t_eval = time.perf_counter()
    timing = {"load_s": t_load - start, "student_s": t_student - t_load, "teacher_s": t_teacher - t_student,
              "teacher_cached": not teacher.computed, "floor_s": t_floor - t_teacher, "evaluate_s": t_eval - t_floor,
              "total_s": t_eval - start}
    return result, summary, timing


def streamed_student(model_id: str, spec: StudentSpec, io: StudentIO, eval_prompts=None, *, dtype: str = "float32",
                     device: str = "cpu"):
    """(summary, Streamer, tokenizer): the student fitted one decoder layer at a time."""
    check_streamable(spec, io)  # before anything loads
    streamer, tokenizer = Streamer.open(model_id, dtype=dtype, device=device)
    summary = fit_streamed_(streamer, tokenizer, spec, io, eval_prompts=eval_prompts, model_id=model_id)
    return summary, streamer, tokenizer


def evaluate_streamed_student(model_id: str, spec: StudentSpec, io: StudentIO, prompts: list[str], *, chat: bool,
                              seed: int, dtype: str, device: str) -> tuple[dict, dict, dict]:
    """(result, summary, timing) of a streamed student: fit and measure one decoder layer at a time."""
    if not isinstance(model_id, str):
        raise InputError("stream=True reads the model from its files: pass its model id, not a loaded model", "stream")
    start = time.perf_counter()
    summary, streamer, tokenizer = streamed_student(model_id, spec, io, prompts, dtype=dtype, device=device)
    t_student = time.perf_counter()
    result = evaluate_streamed(streamer, tokenizer, prompts, summary["modules"], chat=chat, seed=seed)
    summary["stream"] = result["stream"]
    t_eval = time.perf_counter()
    return result, summary, {"stream": True, "student_s": t_student - start, "evaluate_s": t_eval - t_student,
                             "total_s": t_eval - start}


def evaluate_student(model_id_or_model, spec: StudentSpec = StudentSpec(), io: StudentIO = StudentIO(), *,
                     prompts: str | list[str] | None = None, max_new_tokens: int = 32, stream: bool = False,
                     chat: bool = False, seed: int = 0, dtype: str = "float32", device: str = "cpu") -> dict:
    """What `bcllm eval --json` records: {"model", "metrics" (floor and kl_recovered included), "ci",
    "compression", "per_prompt", "num_prompts", "num_positions", "max_new_tokens", "teacher_cache",
    "timing", "versions"}. model_id_or_model: a model id (as load_model takes) or a (model,
    tokenizer) pair; prompts: a prompt file, a list of prompts, or None (the bundled prompts)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}", "max_new_tokens")
    if stream and max_new_tokens:
        raise InputError("max_new_tokens 0 is required with stream: it measures the teacher-forced metrics only "
                         "(greedy generation runs every layer for each new token)", "max_new_tokens")
    config_for(spec)  # the size options must make a config, before any model loads
    texts = prompts if isinstance(prompts, list) else load_prompts(prompts)
    torch.manual_seed(seed)
    options = dict(chat=chat, seed=seed, dtype=dtype, device=device)
    calls = kernel.CALLS[0]
    if stream:
        result, summary, timing = evaluate_streamed_student(model_id_or_model, spec, io, texts, **options)
    else:
        result, summary, timing = evaluate_in_memory(model_id_or_model, spec, io, texts,
                                                     max_new_tokens=max_new_tokens, **options)
    return {"model": model_id_or_model if isinstance(model_id_or_model, str) else None,
            "prompts": str(prompts or default_prompts_path()) if not isinstance(prompts, list) else None,
            "metrics": result["metrics"], "ci": result["ci"], "compression": summary,
            "per_prompt": result["per_prompt"], "num_prompts": result["num_prompts"],
            "num_positions": result["num_positions"], "max_new_tokens": result["max_new_tokens"],
            "teacher_cache": result["teacher_cache"], "timing": timing, "versions": versions(),
            "decode_kernel": {**kernel.usage(), "calls": kernel.CALLS[0] - calls}}


def generate_side_by_side(model_id_or_model, prompt: str, spec: StudentSpec = StudentSpec(),
                          io: StudentIO = StudentIO(), *, max_new_tokens: int = 32, chat: bool = False, seed: int = 0,
                          dtype: str = "float32", device: str = "cpu") -> dict:
    """`bcllm generate`: greedy continuations of one prompt by the original and the student.
    Returns {"teacher", "student" (texts up to the first end token), "teacher_tokens",
    "student_tokens", "agree_tokens" (common prefix length), "compression"}."""
    torch.manual_seed(seed)
    config_for(spec)
    model, tokenizer, model_id = _model(model_id_or_model, dtype, device)
    student, summary = build_student(model, tokenizer, spec, io, model_id=model_id)
    context = context_length(model)
    ids = tokenize_prompts(tokenizer, [prompt], context - max_new_tokens if context else None, chat)
    eos = eos_token_ids(model, tokenizer)
    teacher_new = greedy_generate(model, ids, max_new_tokens, eos)[0].tolist()
    student_new = greedy_generate(student, ids, max_new_tokens, eos)[0].tolist()

    def text(tokens):  # up to the first end token
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        return tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()

    return {"teacher": text(teacher_new), "student": text(student_new), "teacher_tokens": teacher_new,
            "student_tokens": student_new, "agree_tokens": common_prefix_length(teacher_new, student_new),
            "compression": summary}


def lm_eval_student(model_id: str, spec: StudentSpec, io: StudentIO, tasks: list[str], *, limit=None, batch_size=None,
                    include_path=None, dtype: str = "float32", device: str = "cpu") -> tuple[dict, dict, dict]:
    """`bcllm lm-eval`: (result, summary, timing) of lm-evaluation-harness on the original and the student."""
    from .lmeval import bundled_task_texts, check_run_options, lm_eval_side_by_side, task_manager

    start = time.perf_counter()
    check_run_options(limit, batch_size)
    manager = task_manager(tasks, include_path)  # unknown tasks, or no lm-eval, before the model loads
    model, tokenizer = load_model(model_id, dtype=dtype, device=device)
    t_load = time.perf_counter()
    # Calibration text must not contain the bundled tasks' documents (other tasks' text is not known here).
    student, summary = build_student(model, tokenizer, spec, io, eval_prompts=bundled_task_texts(tasks),
                                     model_id=model_id)
    t_student = time.perf_counter()
    result = lm_eval_side_by_side(model, student, tokenizer, tasks, limit=limit, batch_size=batch_size, manager=manager)
    t_eval = time.perf_counter()
    return result, summary, {"load_s": t_load - start, "student_s": t_student - t_load,
                             "lm_eval_s": t_eval - t_student, "total_s": t_eval - start}
