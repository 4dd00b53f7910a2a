"""Reliability: no silently wrong figure under reuse, clear errors for damaged files, atomic writes,
and faults injected at random points (SIGKILL, truncation, a full disk, two processes on one cache).

Each "reuse" test names the case from issue 24 it covers; each fails on the code before the fix."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bcllm import InputError, compress_
from bcllm.errors import InputFileError
from bcllm.structures.circulant import CirculantConfig
from conftest import tiny_model
from test_calibrate import _distill_setup, tiny_batches
from test_experiments import make_tiny_folder

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = make_tiny_folder(tmp_path_factory.mktemp("tiny"))
    (folder / "calib.txt").write_text("\n".join(" ".join(f"w{(5 * i + 3 * j) % 120}" for j in range(12))
                                                for i in range(16)))
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_main(argv, capsys):
    from bcllm.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


# ---------------------------------------------------------------- reuse: silent wrong results

def test_distillation_checkpoint_of_another_starting_student_is_refused(tmp_path):
    """A checkpoint matched only on settings and names was resumed by a point with another fit."""
    from bcllm.fit.distill import DistillConfig, distill_

    cfg = DistillConfig(steps=4, lr=3e-3, topk=16, checkpoint_every=2, eval_every=2)
    student, teacher, train, held = _distill_setup()
    distill_(copy.deepcopy(student), teacher, train, held, cfg, checkpoint_dir=tmp_path, progress=False)
    other = copy.deepcopy(student)  # the same modules and settings, other starting weights (another fit)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if ".mlp." in n and "spectra" not in n).mul_(1.5)
    with pytest.raises(InputError, match="another starting student"):
        distill_(other, teacher, train, held, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(InputError, match="another starting student"):  # other calibration batches
        distill_(copy.deepcopy(student), teacher, tiny_batches(seed=9, n=4), held, cfg, checkpoint_dir=tmp_path,
                 resume=True, progress=False)
    # another block size: a clear refusal, not a RuntimeError from copy_
    wide = copy.deepcopy(teacher)
    compress_(wide, CirculantConfig(block_size=4, targets="mlp"))
    with pytest.raises(InputError, match="module sizes"):
        distill_(wide, teacher, train, held, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_sweep_points_never_share_a_distillation_checkpoint(tiny_folder, tmp_path, cache, capsys):
    """One --distill-dir over a sweep handed every later point the first point's finished state."""
    ck = tmp_path / "ck"
    argv = ["sweep", "--model", tiny_folder, "--out", tmp_path / "run", "--prompts", tiny_folder / "prompts.txt",
            "--max-new-tokens", "0", "--calib", tiny_folder / "calib.txt", "--fit", "aware", "--distill-steps", "2",
            "--distill-dir", ck, "--resume", "--grid", "block_size", "2", "4", "--grid", "ridge", "0.0001", "0.1"]
    code, out = run_main(argv, capsys)
    assert code == 0, out.err
    folders = sorted(p.name for p in ck.iterdir())
    assert len(folders) == 4 and all(f.startswith("point-") for f in folders)
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    kls = {(r["point"]["block_size"], r["point"]["ridge"]): r["metrics"]["kl_mean"] for r in records}
    assert len(set(kls.values())) == 4  # every point measured its own student


def test_results_directory_refuses_another_seed_device_or_weights(tiny_folder, tmp_path, cache, capsys):
    """--seed 1 on a seed-0 directory reused its records; a model folder overwritten in place was accepted."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    base = ["sweep", "--model", model, "--out", tmp_path / "run", "--prompts", model / "prompts.txt",
            "--max-new-tokens", "0", "--grid", "block_size", "2"]
    assert run_main(base, capsys)[0] == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {"seed", "device", "weights_sha256", "torch", "transformers"} <= set(manifest["identity"])
    code, out = run_main(base + ["--seed", "1"], capsys)
    assert code == 2 and "seed=0" in out.err and "seed=1" in out.err
    tiny_model("llama", seed=5).save_pretrained(model)  # the same folder, other weights
    code, out = run_main(base, capsys)
    assert code == 2 and "weights_sha256" in out.err


def test_an_old_manifest_without_the_new_keys_still_opens_and_records_them(tmp_path):
    from bcllm.experiments.runs import open_results_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"identity": {"model": "m", "dtype": "float32"}}))
    identity = {"model": "m", "dtype": "float32", "seed": 0, "device": "cpu", "weights_sha256": "abc"}
    open_results_dir(out, identity)  # earlier runs had seed 0 on the CPU; the fingerprint is recorded now
    assert json.loads((out / "manifest.json").read_text())["identity"] == identity
    with pytest.raises(InputError, match="weights_sha256='abc'"):
        open_results_dir(out, {**identity, "weights_sha256": "other"})
    with pytest.raises(InputError, match="seed=0"):
        (out / "manifest.json").write_text(json.dumps({"identity": {"model": "m", "dtype": "float32"}}))
        open_results_dir(out, {**identity, "seed": 3})


def test_shared_input_statistics_follow_the_weights_not_the_object(monkeypatch):
    """Keyed on id(teacher): a teacher changed in place (or a new copy at a reused id) got stale statistics."""
    from bcllm.fit import closed_form as cf

    teacher, batches = tiny_model("llama", layers=2), tiny_batches(seed=1, n=2)
    names = ["model.layers.0.mlp.down_proj"]
    with cf.shared_input_stats():
        first = cf._teacher_stats(teacher, names, batches, False)[names[0]]
        with torch.no_grad():
            teacher.model.layers[0].mlp.up_proj.weight.mul_(3.0)  # same object, other weights
        second = cf._teacher_stats(teacher, names, batches, False)[names[0]]
    reference = cf.input_stats(teacher, names, batches, False)[names[0]]
    assert not torch.allclose(first.xx, second.xx)
    assert torch.allclose(second.xx, reference.xx)


def test_teacher_cache_key_covers_attention_and_library_versions(tiny_folder, tmp_path, monkeypatch):
    import bcllm.eval.metrics as ev
    from bcllm.io.models import load_model

    model, tok = load_model(str(tiny_folder))
    prompts = ["w1 w2 w3", "w4 w5"]
    a = ev.TeacherCache.build(model, tok, prompts, max_new_tokens=2, root=tmp_path, progress=False)
    model.config._attn_implementation = "sdpa" if model.config._attn_implementation != "sdpa" else "eager"
    b = ev.TeacherCache.build(model, tok, prompts, max_new_tokens=2, root=tmp_path, progress=False)
    monkeypatch.setattr(ev, "library_versions", lambda: {"torch": "0.0", "transformers": "0.0"})
    c = ev.TeacherCache.build(model, tok, prompts, max_new_tokens=2, root=tmp_path, progress=False)
    assert len({a.path, b.path, c.path}) == 3 and b.computed and c.computed


def test_self_written_calibration_key_covers_batch_size(tiny_folder, cache):
    from bcllm.fit.calib_text import self_generated
    from bcllm.io.models import load_model

    model, tok = load_model(str(tiny_folder))
    self_generated(model, tok, 3, "self-seed", max_new_tokens=2, batch_size=2, progress=False)
    self_generated(model, tok, 3, "self-seed", max_new_tokens=2, batch_size=3, progress=False)
    assert len(list((cache / "calib").glob("self-seed-*.json"))) == 2  # batch size sets seeds and padding


# ---------------------------------------------------------------- damaged files: clear errors or recovery

@pytest.fixture(scope="module")
def saved_student(tiny_folder, tmp_path_factory):
    from bcllm.cli import main

    out = tmp_path_factory.mktemp("student") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BCLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert main(["compress", "--model", str(tiny_folder), "--block-size", "4", "--save", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage", ["truncate tensors", "corrupt json", "json not an object", "tensors missing",
                                    "json missing", "flip tensor bytes"])
def test_damaged_student_folder_is_one_clear_line(saved_student, tiny_folder, tmp_path, cache, capsys, damage):
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(saved_student, folder)
    tensors, meta = folder / "fitted.safetensors", folder / "fitted.json"
    data = tensors.read_bytes()
    if damage == "truncate tensors":
        tensors.write_bytes(data[:len(data) // 2])
    elif damage == "corrupt json":
        meta.write_text(meta.read_text()[:40])
    elif damage == "json not an object":
        meta.write_text("[1, 2]")
    elif damage == "tensors missing":
        tensors.unlink()
    elif damage == "json missing":
        meta.unlink()
    else:
        tensors.write_bytes(data[:-8] + bytes(8))
    code, out = run_main(["eval", "--model", tiny_folder, "--load", folder, "--prompts", tiny_folder / "prompts.txt",
                          "--max-new-tokens", "0"], capsys)
    assert code == 2 and "Traceback" not in out.err
    lines = [line for line in out.err.splitlines() if line.startswith("bcllm")]  # (progress bars aside)
    assert len(lines) == 1 and str(folder) in lines[0], out.err


def test_truncated_model_cache_is_set_aside_and_rebuilt(tiny_folder, tmp_path, monkeypatch, capsys):
    """A truncated cached conversion failed every later run with a SafetensorError traceback."""
    from bcllm.io import models

    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    conversions = []

    def convert(gguf, folder):  # stands in for the GGUF dequantisation: the tiny folder's files
        conversions.append(folder)
        import shutil
        shutil.copytree(tiny_folder, folder)

    monkeypatch.setattr(models, "resolve_model", lambda model_id: ("gguf", fake))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    model, _ = models.load_model("tiny-gguf")
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    del model  # its tensors may map the file cut below
    folder = conversions[0]
    st = next(folder.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:st.stat().st_size // 3])
    capsys.readouterr()
    again, _ = models.load_model("tiny-gguf")
    err = capsys.readouterr().err
    assert len(conversions) == 2 and "was damaged" in err
    assert len([line for line in err.splitlines() if line.startswith("bcllm")]) == 1, err
    assert list(folder.parent.glob(f"{folder.name}.damaged*"))
    for n, p in again.named_parameters():
        assert torch.equal(p, want[n]), n


def test_damaged_user_model_folder_is_a_clear_error(tiny_folder, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    st = next(model.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:100])
    code, out = run_main(["eval", "--model", model, "--block-size", "4", "--prompts", model / "prompts.txt",
                          "--max-new-tokens", "0"], capsys)
    assert code == 2 and "is damaged" in out.err and "Traceback" not in out.err


def test_damaged_teacher_cache_is_rebuilt(tiny_folder, tmp_path, capsys):
    import bcllm.eval.metrics as ev
    from bcllm.io.models import load_model

    model, tok = load_model(str(tiny_folder))
    first = ev.TeacherCache.build(model, tok, ["w1 w2 w3", "w4 w5"], max_new_tokens=2, root=tmp_path,
                                  progress=False)
    want = first.logits(1).clone()
    logits = first.path / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:200])
    with pytest.raises(InputFileError, match="teacher cache"):
        ev.TeacherCache.load(first.path)
    capsys.readouterr()
    again = ev.TeacherCache.build(model, tok, ["w1 w2 w3", "w4 w5"], max_new_tokens=2, root=tmp_path,
                                  progress=False)
    assert again.computed and torch.equal(again.logits(1), want)
    assert "was damaged" in capsys.readouterr().err


def test_damaged_calibration_cache_and_distillation_checkpoint(tiny_folder, tmp_path, cache, capsys):
    from bcllm.fit.calib_text import self_generated
    from bcllm.fit.distill import DistillConfig, distill_
    from bcllm.io.models import load_model

    model, tok = load_model(str(tiny_folder))
    first = self_generated(model, tok, 2, "self-seed", max_new_tokens=2, progress=False)
    (path,) = (cache / "calib").glob("self-seed-*.json")
    path.write_text(path.read_text()[:30])
    capsys.readouterr()
    assert self_generated(model, tok, 2, "self-seed", max_new_tokens=2, progress=False) == first
    assert "was damaged" in capsys.readouterr().err

    cfg = DistillConfig(steps=2, topk=16, checkpoint_every=1)
    student, teacher, train, held = _distill_setup()
    distill_(copy.deepcopy(student), teacher, train, held, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    state = tmp_path / "ck" / "distill_state.pt"
    state.write_bytes(state.read_bytes()[:500])
    with pytest.raises(InputFileError, match="distill_state.pt.*damaged"):
        distill_(copy.deepcopy(student), teacher, train, held, cfg, checkpoint_dir=tmp_path / "ck", resume=True,
                 progress=False)


def test_save_refuses_a_folder_of_other_files(tiny_folder, tmp_path):
    from bcllm.io.checkpoint import save_fitted

    student = tiny_model("llama", layers=2)
    compress_(student, CirculantConfig(block_size=4, targets="mlp"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InputFileError, match="other files"):
        save_fitted(student, other, CirculantConfig(block_size=4, targets="mlp"))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- atomic writes and a full disk

def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    from bcllm.io.results import atomic_write

    path = tmp_path / "r.json"
    atomic_write(path, "old")

    def full_disk(tmp):
        Path(tmp).write_bytes(b"half a fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, full_disk)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_full_disk_while_saving_a_student_leaves_the_earlier_student(saved_student, tiny_folder, tmp_path,
                                                                      monkeypatch):
    import shutil

    from bcllm.io import checkpoint
    from bcllm.io.artifact import load_student

    folder = tmp_path / "s"
    shutil.copytree(saved_student, folder)
    student, _, _ = load_student(folder, model=str(tiny_folder))

    def full(tensors, path):
        Path(path).write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError):
        checkpoint.save_fitted(student, folder, CirculantConfig(block_size=4, targets="mlp"))
    # the save was interrupted: the folder holds no student (fitted.json removed first), never a wrong one
    with pytest.raises(InputFileError, match="no fitted student"):
        load_student(folder, model=str(tiny_folder))
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------- SIGKILL at random points, then resume

def _killed_at_random(script: str, delays, cwd: Path, env: dict, progress: Path) -> int:
    """Run `script` in fresh processes, each SIGKILLed `delay` seconds after it first wrote to
    `progress` (a file or folder: a new file or a new modification time below it), or left to
    finish; returns how many were killed before they finished. Waiting for progress, not for a
    fixed time, puts every kill inside the work whatever the machine's speed."""
    def snapshot():
        if not progress.exists():
            return []
        files = [progress] if progress.is_file() else sorted(progress.rglob("*"))
        return [(str(p), p.stat().st_mtime_ns) for p in files if p.is_file()]

    killed = 0
    for delay in delays:
        before = snapshot()
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while proc.poll() is None and snapshot() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
    return killed


def _env(tmp_path) -> dict:
    return {**os.environ, "BCLLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")])}


@pytest.mark.slow
def test_sigkill_during_sweeps_loses_nothing_and_reuses_nothing(tiny_folder, tmp_path):
    """A sweep killed at random moments and rerun: every point once, each equal to an unbroken run's."""
    argv = ["sweep", "--model", str(tiny_folder), "--prompts", str(tiny_folder / "prompts.txt"),
            "--max-new-tokens", "2", "--grid", "block_size", "2", "4", "8", "--grid", "layers", "0", "all"]
    env = _env(tmp_path)
    script = "import sys; from bcllm.cli import main; sys.exit(main({}))"
    subprocess.run([sys.executable, "-c", script.format(argv + ["--out", str(tmp_path / "straight")])], env=env,
                   check=True, capture_output=True)
    broken = argv + ["--out", str(tmp_path / "broken")]
    rng = random.Random(0)
    killed = _killed_at_random(script.format(broken), [rng.uniform(0, 3) for _ in range(4)], tmp_path, env,
                               tmp_path / "broken")
    subprocess.run([sys.executable, "-c", script.format(broken)], env=env, check=True, capture_output=True)
    assert killed >= 1

    def records(run):
        rows = [json.loads(line) for line in (tmp_path / run / "results.jsonl").read_text().splitlines()
                if line.strip()]
        return {r["key"]: r["metrics"] for r in rows if "key" in r}, len(rows)

    straight, n_straight = records("straight")
    broken_records, n_broken = records("broken")
    assert n_straight == 6 and len(broken_records) == 6 and n_broken >= 6
    for key, metrics in straight.items():
        assert broken_records[key]["kl_mean"] == pytest.approx(metrics["kl_mean"], rel=1e-5), key


SAVE_LOOP = textwrap.dedent("""
    import copy, torch
    from bcllm import compress_
    from bcllm.io.checkpoint import save_fitted
    from bcllm.structures.circulant import CirculantConfig
    from conftest import tiny_model
    base = tiny_model("llama", layers=2)
    cfg = CirculantConfig(block_size=4, targets="mlp")
    for i in range(10_000):  # every save a different student: a torn save would pair old and new files
        s = copy.deepcopy(base)
        compress_(s, cfg)
        with torch.no_grad():
            for n, p in s.named_parameters():
                if ".mlp." in n:
                    p.fill_(float(i % 97))
        save_fitted(s, {out!r}, cfg, info={{"i": i}})
""")


def test_sigkill_during_saves_leaves_a_whole_student_or_a_clear_error(tmp_path):
    from bcllm.io.checkpoint import load_fitted

    out = tmp_path / "student"
    env = _env(tmp_path)
    rng = random.Random(1)
    for delay in [rng.uniform(0, 1) for _ in range(4)]:
        assert _killed_at_random(SAVE_LOOP.format(out=str(out)), [delay], tmp_path, env, out) == 1
        model = tiny_model("llama", layers=2)
        try:
            summary = load_fitted(model, out)
        except InputFileError as e:  # killed between the two files: said, never a wrong student
            assert "save" in str(e)
            continue
        i = summary["info"]["i"]
        for n, p in model.named_parameters():
            if ".mlp." in n:
                assert torch.all(p == float(i % 97)), (n, i)  # the tensors are the ones fitted.json names


def test_two_processes_building_one_teacher_cache(tiny_folder, tmp_path):
    script = textwrap.dedent(f"""
        import bcllm.eval.metrics as ev
        from bcllm.io.models import load_model
        model, tok = load_model({str(tiny_folder)!r})
        prompts = [" ".join(f"w{{(i * 7 + j) % 100}}" for j in range(20)) for i in range(40)]
        c = ev.TeacherCache.build(model, tok, prompts, max_new_tokens=4, progress=False)
        print(c.path, float(c.logits(39).sum()))
    """)
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate()[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]  # one cache folder, the same figures
    assert not list((tmp_path / "cache" / "teacher").glob(".*tmp*"))


@pytest.mark.slow
def test_sigkill_during_block_fit_and_distillation_resumes_to_the_same_student(tiny_folder, tmp_path):
    """`compress --fit block --distill-dir D --resume` killed at random moments (each within half a
    second of the run's first checkpoint write) and rerun ends with
    the student an unbroken run saves (stage checkpoints per layer, then distillation checkpoints)."""
    from safetensors.torch import load_file

    env = _env(tmp_path)
    script = "import sys; from bcllm.cli import main; sys.exit(main({}))"

    def argv(name):
        return ["compress", "--model", str(tiny_folder), "--block-size", "4", "--fit", "block", "--calib",
                str(tiny_folder / "calib.txt"), "--distill-steps", "300", "--distill-dir", str(tmp_path / f"ck-{name}"),
                "--resume", "--save", str(tmp_path / name)]

    subprocess.run([sys.executable, "-c", script.format(argv("straight"))], env=env, check=True, capture_output=True)
    rng = random.Random(2)
    killed = _killed_at_random(script.format(argv("broken")), [rng.uniform(0, 0.5) for _ in range(4)], tmp_path, env,
                               tmp_path / "ck-broken")
    assert killed >= 1 and list((tmp_path / "ck-broken" / "block").glob("layer_*.pt"))  # killed after layers were kept
    subprocess.run([sys.executable, "-c", script.format(argv("broken"))], env=env, check=True, capture_output=True)
    straight, broken = (load_file(str(tmp_path / n / "fitted.safetensors")) for n in ("straight", "broken"))
    assert straight.keys() == broken.keys()
    for name in straight:
        assert torch.equal(straight[name], broken[name]), name


# ---------------------------------------------------------------- figures say how they were made

def test_a_failed_compile_is_said_in_the_figure_not_hidden(monkeypatch):
    """On a compile failure bench model's headline decode figure silently became the eager one."""
    import bcllm.bench.measure as bm
    from bcllm.structures.circulant import fuse_circulant_mlp_

    model = tiny_model("llama", layers=2)
    student = copy.deepcopy(model)
    compress_(student, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(student)
    monkeypatch.setattr(bm, "compile_steps", lambda models, prompt, caches, cuda_graphs=False: (dict(models), {}, "no compiler (injected)"))
    r = bm.bench_model(model, student, [[1, 2, 3]], new_tokens=2, repeats=1, compile=True)
    assert not r["compiled"] and r["decode_mode"] == "eager (torch.compile failed)"
    assert "torch.compile failed (no compiler (injected))" in bm.model_table(r)
    assert set(r["decode_kernel"]) >= {"state", "calls"}


def test_eval_records_whether_the_fused_kernel_ran(tiny_folder, cache, monkeypatch):
    from bcllm import StudentSpec
    from bcllm.eval.student import evaluate_student
    from bcllm.ops import kernel

    spec = StudentSpec(block_size=4)
    prompts = ["w1 w2 w3", "w4 w5 w6 w7"]
    with_generation = evaluate_student(str(tiny_folder), spec, prompts=prompts, max_new_tokens=3)
    record = with_generation["decode_kernel"]
    if kernel.load() is not None:  # decode products of one row go to the kernel where it is built
        assert record["state"] == "built" and record["calls"] > 0
    monkeypatch.setenv(kernel.DISABLE_ENV, "1")
    off = evaluate_student(str(tiny_folder), spec, prompts=prompts, max_new_tokens=3)["decode_kernel"]
    assert off["calls"] == 0
