import itertools
import json

import pytest

from bcllm.experiments import runs as ex


def test_grid_file_axes_and_fixed_values(tmp_path):
    f = tmp_path / "grid.toml"
    f.write_text('block_size = [4, 8]\nlayers = ["12", "10-19"]\ntargets = "mlp"\n')
    axes = ex.read_grid_file(f)
    assert axes == {"block_size": [4, 8], "layers": ["12", "10-19"], "targets": ["mlp"]}
    points = ex.expand_grid({"block_size": 16, "layers": "all", "targets": "attn"}, axes)
    expected = [{"block_size": b, "layers": l, "targets": "mlp"} for b, l in itertools.product([4, 8], ["12", "10-19"])]
    assert points == expected


def test_grid_flags_convert_like_the_option_and_override_the_file(tmp_path):
    f = tmp_path / "grid.toml"
    f.write_text("block-size = [4, 8]\n")
    axes = ex.grid_axes(f, [["block_size", "32", "64"], ["layers", "0,3,5", "all"]])
    assert axes == {"block_size": [32, 64], "layers": ["0,3,5", "all"]}


@pytest.mark.parametrize("text, message", [
    ("block_size = [4, \n", "not valid TOML"),
    ("blok_size = [4]\n", "unknown setting 'blok_size'"),
    ("block_size = ['x']\n", "cannot read 'x' as int"),
    ("block_size = []\n", "empty list"),
    ("block_size = [[4]]\n", "must be a number or a string"),
    ("[grid]\nblock_size = [4]\n", "tables are not allowed"),
    ("block_size = true\n", "expected a value like 16"),
])
def test_malformed_grid_files_give_clear_errors(tmp_path, text, message):
    f = tmp_path / "grid.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        ex.read_grid_file(f)


def test_missing_and_binary_grid_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ex.read_grid_file(tmp_path / "nope.toml")
    f = tmp_path / "bin.toml"
    f.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not valid TOML"):
        ex.read_grid_file(f)


def test_grid_flag_without_values():
    with pytest.raises(ValueError, match="at least one value"):
        ex.grid_axes(None, [["block_size"]])


def test_layers_spec_is_canonical():
    assert ex.layers_spec("10-19", 30) == "10-19"
    assert ex.layers_spec("10,11,12,13,14,15,16,17,18,19", 30) == "10-19"
    assert ex.layers_spec("8,0,1,2,3", 30) == "0-3,8"
    assert ex.layers_spec("0-29", 30) == "all"
    assert ex.layers_spec("all", 30) == "all"
    assert ex.layers_spec(12, 30) == "12"
    assert ex.num_patched_layers("all", 30) == 30
    assert ex.num_patched_layers("0-3,8", 30) == 5


def test_point_key_ignores_defaults_and_order():
    a = ex.point_key({"layers": "12", "block_size": 16, "targets": "mlp"})
    b = ex.point_key({"block_size": 16, "layers": "12"})
    assert a == b == json.dumps({"layers": "12"})
    assert ex.point_key({"layers": "12", "block_size": 8}) != a


def fake_measure(calls, fail_after=None):
    def measure(point):
        if fail_after is not None and len(calls) == fail_after:
            raise RuntimeError("killed")
        calls.append(point)
        return {"metrics": {"kl_mean": point["block_size"] / 100}}
    return measure


def test_resume_after_a_failure_does_not_recompute_finished_points(tmp_path):
    results = tmp_path / "results.jsonl"
    points = ex.expand_grid({}, {"block_size": [4, 8, 16, 32], "layers": ["12", "all"]})
    first = []
    with pytest.raises(RuntimeError):
        ex.run_points(points, fake_measure(first, fail_after=3), results)
    assert len(first) == 3 and len(ex.finished(results)) == 3
    before = results.read_text()
    second = []
    records = ex.run_points(points, fake_measure(second), results)
    assert [p for p in second] == points[3:]             # only the unfinished points ran
    assert results.read_text().startswith(before)        # nothing written before was changed
    assert [r["point"] for r in records] == points       # all records come back, in grid order
    assert [r["metrics"]["kl_mean"] for r in records] == [p["block_size"] / 100 for p in points]
    third = []
    ex.run_points(points, fake_measure(third), results)
    assert third == []


def test_points_finished_meanwhile_by_another_process_are_skipped(tmp_path):
    results = tmp_path / "results.jsonl"
    points = ex.expand_grid({}, {"block_size": [4, 8, 16]})
    calls = []

    def measure(point):  # while point 4 runs, "another process" finishes point 8
        if point["block_size"] == 4:
            ex.run_points([points[1]], fake_measure([]), results)
        calls.append(point)
        return {"metrics": {}}

    records = ex.run_points(points, measure, results)
    assert calls == [points[0], points[2]]
    assert [r["point"] for r in records] == points


def test_a_torn_last_line_is_recomputed_and_earlier_lines_kept(tmp_path):
    results = tmp_path / "results.jsonl"
    points = ex.expand_grid({}, {"block_size": [4, 8]})
    ex.run_points(points[:1], fake_measure([]), results)
    with open(results, "a") as f:
        f.write('{"key": "torn')                          # a kill in the middle of a write
    calls = []
    ex.run_points(points, fake_measure(calls), results)
    assert calls == points[1:]
    assert len(ex.finished(results)) == 2                 # the new record did not land on the torn line


def test_results_dir_refuses_another_model_and_foreign_dirs(tmp_path):
    out = tmp_path / "run"
    ex.open_results_dir(out, {"model": "smollm2-135m", "prompts": "abc"})
    ex.open_results_dir(out, {"model": "smollm2-135m", "prompts": "abc"})   # same run: fine
    with pytest.raises(ValueError, match="model='smollm2-135m'.*model='gemma3-270m'"):
        ex.open_results_dir(out, {"model": "gemma3-270m", "prompts": "abc"})
    with pytest.raises(ValueError, match="prompts"):
        ex.open_results_dir(out, {"model": "smollm2-135m", "prompts": "xyz"})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        ex.open_results_dir(foreign, {"model": "m"})
    with pytest.raises(ValueError, match="does not exist"):
        ex.open_results_dir(tmp_path / "a" / "b", {"model": "m"})


def table(kls, agreements, saved=100):
    return [{"layer": i, "kl_mean": k, "token_agreement": a, "saved_params": saved}
            for i, (k, a) in enumerate(zip(kls, agreements))]


def test_budget_params_takes_least_sensitive_layers_first():
    t = table([0.9, 0.1, 0.5, 0.05, 0.3], [0.5, 0.9, 0.7, 0.95, 0.8])
    chosen = ex.select_budget(t, "params", 0.25, model_params=1000)     # needs 250 -> 3 layers
    assert [r["layer"] for r in chosen] == [1, 3, 4]
    assert ex.predict(chosen)["kl_mean"] == pytest.approx(0.45)
    # brute force: no other 3-layer set has a smaller summed KL
    best = min(itertools.combinations(t, 3), key=lambda rows: sum(r["kl_mean"] for r in rows))
    assert sorted(r["layer"] for r in best) == [1, 3, 4]


def test_budget_agreement_floor_and_kl_ceiling():
    t = table([0.9, 0.1, 0.5, 0.05, 0.3], [0.5, 0.9, 0.7, 0.95, 0.8])
    chosen = ex.select_budget(t, "agreement", 0.84, model_params=1000)  # drops 0.05 + 0.1 = 0.15
    assert [r["layer"] for r in chosen] == [1, 3]
    assert ex.predict(chosen)["token_agreement"] == pytest.approx(0.85)
    assert [r["layer"] for r in ex.select_budget(t, "kl", 0.46, 1000)] == [1, 3, 4]


def test_budget_errors():
    t = table([0.1, 0.2], [0.9, 0.8])
    with pytest.raises(ValueError, match="out of reach"):
        ex.select_budget(t, "params", 0.5, model_params=1000)
    with pytest.raises(ValueError, match="admits no layer"):
        ex.select_budget(t, "agreement", 0.99, model_params=1000)
    for bad in ["params", "size=0.3", "params=abc", "params=1.5", "kl=-1"]:
        with pytest.raises(ValueError, match="budget"):
            ex.parse_budget(bad)
    assert ex.parse_budget("agreement=0.9") == ("agreement", 0.9)


def test_contiguous_windows():
    assert ex.contiguous_windows(10, 30) == {"first": "0-9", "middle": "10-19", "last": "20-29"}
    assert ex.contiguous_windows(1, 30)["middle"] == "14"


def test_pareto_front_against_brute_force():
    import random

    rng = random.Random(0)
    records = [{"x": rng.choice([0.1, 0.2, 0.3, 0.4]), "y": rng.random()} for _ in range(40)]
    front = ex.pareto_front(records, "x", "y", maximize_y=True)
    dominated = [r for r in records if any(o["x"] >= r["x"] and o["y"] >= r["y"] and (o["x"], o["y"]) != (r["x"], r["y"])
                                           for o in records)]
    assert {(r["x"], r["y"]) for r in front} == {(r["x"], r["y"]) for r in records if r not in dominated}
    assert [r["x"] for r in front] == sorted(r["x"] for r in front)
    low = ex.pareto_front(records, "x", "y", maximize_y=False)
    assert all(not any(o["x"] >= r["x"] and o["y"] < r["y"] for o in records) for r in low)


# ---------------------------------------------------------------- end to end on a tiny model folder

def make_tiny_folder(folder):
    """A tiny random Llama saved as a model folder with a word-level tokenizer, so the CLI can load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(120)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(" ".join(f"w{(7 * i + j) % 120}" for j in range(3 + i % 4)) for i in range(6)))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"))


def sweep_argv(folder, out, *grid):
    return ["sweep", "--model", str(folder), "--out", str(out), "--prompts", str(folder / "prompts.txt"),
            "--max-new-tokens", "3", *grid]


GRID = ["--grid", "block_size", "2", "8", "--grid", "layers", "0", "1-2", "all"]


@pytest.fixture
def cache(tiny_folder, monkeypatch):
    monkeypatch.setenv("BCLLM_CACHE", str(tiny_folder / "cache"))  # one teacher cache for these tests


def test_sweep_resumes_after_an_exception_without_recomputing(tiny_folder, tmp_path, cache, monkeypatch):
    import bcllm.eval.metrics
    from bcllm.cli import main

    real = bcllm.eval.metrics.evaluate
    calls = []

    def flaky(*a, **kw):
        if kw.get("generate") is False:  # the floor of a module set, measured once per results directory
            return real(*a, **kw)
        if len(calls) == 2 and fail:
            raise RuntimeError("injected failure after 2 points")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(bcllm.eval.metrics, "evaluate", flaky)
    out = tmp_path / "run"
    fail = True
    with pytest.raises(RuntimeError, match="injected"):
        main(sweep_argv(tiny_folder, out, *GRID))
    first = (out / "results.jsonl").read_text()
    assert len(first.splitlines()) == 2
    fail, calls[:] = False, []
    assert main(sweep_argv(tiny_folder, out, *GRID)) == 0
    assert len(calls) == 6 - 2                                # finished points were not recomputed
    assert (out / "results.jsonl").read_text().startswith(first)
    records = ex.finished(out / "results.jsonl")
    assert len(records) == 6
    keys = json.loads((out / "sweep.json").read_text())["keys"]
    assert [json.loads(k).get("block_size", 16) for k in keys] == [2, 2, 2, 8, 8, 8]
    for r in records.values():
        # the record's parameter reduction is what compress_ reported for that point
        c = r["compression"]
        assert r["param_reduction"] == pytest.approx((c["replaced_params"] - c["structured_params"]) / c["model_params_before"])
        assert r["num_layers"] == {"0": 1, "1-2": 2, "all": 4}[r["point"]["layers"]]
    # b=2 on layers "all" removes more parameters than on layer 0 alone
    by = {(r["point"]["block_size"], r["point"]["layers"]): r for r in records.values()}
    assert by[(2, "all")]["param_reduction"] > by[(2, "0")]["param_reduction"] > 0


def test_sweep_refuses_another_model_and_bad_grids(tiny_folder, tmp_path, cache, capsys):
    from bcllm.cli import main

    out = tmp_path / "run"
    assert main(sweep_argv(tiny_folder, out, "--grid", "block_size", "2")) == 0
    other = tmp_path / "other"
    import shutil
    shutil.copytree(tiny_folder, other)
    capsys.readouterr()
    assert main(sweep_argv(other, out, "--grid", "block_size", "2")) == 2
    assert "holds results for model=" in capsys.readouterr().err
    assert main(sweep_argv(tiny_folder, out, "--grid", "blocksize", "2")) == 2
    assert "--grid: unknown setting 'blocksize'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("block_size = [2,\n")
    assert main(sweep_argv(tiny_folder, out, "--grid-file", str(bad))) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(sweep_argv(tiny_folder, out)) == 2
    assert "no axes" in capsys.readouterr().err



def test_sweep_killed_mid_run_resumes_without_recomputing(tiny_folder, tmp_path, cache, monkeypatch):
    """A real kill (SIGKILL of the process, mid-sweep): every record on disk survives and is not redone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import bcllm.eval.metrics
    from bcllm.cli import main

    out = tmp_path / "run"
    argv = sweep_argv(tiny_folder, out, *GRID)
    env = {**os.environ, "BCLLM_CACHE": str(tiny_folder / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "bcllm.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(ex.finished(out / "results.jsonl")) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (out / "results.jsonl").read_text()
    done = len(ex.finished(out / "results.jsonl"))
    assert 1 <= done
    calls = []
    real = bcllm.eval.metrics.evaluate
    monkeypatch.setattr(bcllm.eval.metrics, "evaluate",
                        lambda *a, **kw: (kw.get("generate") is not False and calls.append(1)) or real(*a, **kw))
    assert main(argv) == 0
    assert len(calls) == 6 - done
    assert (out / "results.jsonl").read_text().startswith(before)
    assert len(ex.finished(out / "results.jsonl")) == 6


def test_report_renders_tables_and_plots_from_result_files(tmp_path):
    from bcllm.experiments.report import render
    from bcllm.io.results import append_jsonl, write_json

    run = tmp_path / "run"
    ex.open_results_dir(run, {"model": "tiny", "num_prompts": 3, "model_params": 1000})
    keys = []
    for fit, b, layers, n in itertools.product(["frobenius", "aware"], [4, 16], ["0", "0-1", "all"], [None]):
        n = {"0": 1, "0-1": 2, "all": 4}[layers]
        point = {"fit": fit, "block_size": b, "layers": layers}
        kl = 0.1 * n * b / 4 / (2 if fit == "aware" else 1)
        append_jsonl(run / "results.jsonl", {"key": ex.point_key(point), "point": point, "time_s": 1.0,
                                             "metrics": {"kl_mean": kl, "token_agreement": 1 / (1 + kl)},
                                             "param_reduction": n * 0.1 * (1 - 1 / b), "num_layers": n})
        keys.append(ex.point_key(point))
    write_json(run / "sweep.json", {"keys": keys, "command": "bcllm sweep ..."})
    scan = []
    for layer in range(4):
        point = {"layers": str(layer)}
        append_jsonl(run / "results.jsonl", {"key": ex.point_key(point), "point": point, "time_s": 1.0,
                                             "metrics": {"kl_mean": 0.1 + layer, "token_agreement": 0.9 - layer / 10},
                                             "param_reduction": 0.09, "num_layers": 1})
        scan.append(ex.point_key(point))
    write_json(run / "scan.json", {"keys": scan, "command": "bcllm scan ..."})
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [{"shape": [1536, 576], "tokens": 1, "block_size": b, "speedup": b / 2}
                                             for b in (4, 16)]}))
    written = render(run, tmp_path / "results.md", [bench])
    text = (tmp_path / "results.md").read_text()
    assert "## Sweep: 12 points" in text and "## Per-layer sensitivity scan" in text and "## Speed" in text
    # b=16, 2 layers, aware: kl = 0.1*2*16/4/2 = 0.4, agreement 1/1.4, reduction 2*0.1*15/16 = 18.75 %
    assert "| 16 | 0-1 | aware | 18.8 | 0.714 | 0.400 | 1 |" in text
    for png in written[1:]:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no manifest.json"):
        render(tmp_path, tmp_path / "x.md")
    other = tmp_path / "other"
    ex.open_results_dir(other, {"model": "another"})
    with pytest.raises(ValueError, match="different models"):
        render([run, other], tmp_path / "x.md")


# ---------------------------------------------------------------- the library call behind `bcllm eval`

def test_evaluate_student_gives_the_cli_record(tiny_folder, tmp_path, cache, capsys):
    """bcllm.evaluate_student returns the figures `bcllm eval --json` writes, floor included."""
    from bcllm import StudentSpec, evaluate_student
    from bcllm.cli import main

    out = tmp_path / "r.json"
    prompts = str(tiny_folder / "prompts.txt")
    assert main(["eval", "--model", str(tiny_folder), "--layers", "0-1", "--block-size", "4", "--prompts", prompts,
                 "--max-new-tokens", "3", "--json", str(out)]) == 0
    cli = json.loads(out.read_text())
    record = evaluate_student(str(tiny_folder), StudentSpec(layers="0-1", block_size=4), prompts=prompts,
                              max_new_tokens=3)
    assert "floor_kl_mean" in record["metrics"] and "kl_recovered" in record["metrics"]
    assert record["metrics"] == pytest.approx(cli["metrics"])
    assert record["compression"]["modules"] == cli["compression"]["modules"]
    assert len(record["per_prompt"]) == len(cli["per_prompt"]) == 6


# ---------------------------------------------------------------- results written before a key was renamed

def test_records_with_only_the_old_circulant_params_key_are_read(tmp_path, capsys):
    """compress_'s summary names the structured modules' parameter count structured_params (it
    counts low-rank ones too); results written before hold circulant_params, and every reader
    takes either (tests/data/old_layout: a results directory of that time)."""
    import shutil
    from pathlib import Path

    from bcllm.cli.main import print_summary
    from bcllm.experiments.report import load_run
    from bcllm.io.results import structured_params, with_current_keys

    old = Path(__file__).parent / "data" / "old_layout"
    assert '"circulant_params"' in (old / "results.jsonl").read_text()
    assert '"structured_params"' not in (old / "results.jsonl").read_text()
    run = tmp_path / "run"
    shutil.copytree(old, run)
    for records in (ex.finished(run / "results.jsonl").values(), load_run(run)["records"].values()):
        records = list(records)
        assert len(records) == 16
        for r in records:
            c = r["compression"]
            assert c["structured_params"] == c["circulant_params"] == structured_params(c) > 0
    summary = {k: v for k, v in records[0]["compression"].items() if k != "structured_params"}
    assert structured_params(summary) == summary["circulant_params"]
    assert structured_params({"structured_params": 7, "circulant_params": 9}) == 7  # the new key wins
    assert with_current_keys({"compression": {"circulant_params": 5}}) == {
        "compression": {"circulant_params": 5, "structured_params": 5}}
    print_summary(summary)
    assert f"-> {summary['circulant_params']:,} (" in capsys.readouterr().out
