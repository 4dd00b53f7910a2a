import itertools
import json

import pytest

from bcllm import experiments as ex
from bcllm.cli import add_compress_args

OPTIONS = ex.point_options(add_compress_args)
DEFAULTS = {k: a.default for k, a in OPTIONS.items()}


def test_grid_file_axes_and_fixed_values(tmp_path):
    f = tmp_path / "grid.toml"
    f.write_text('block_size = [4, 8]\nlayers = ["12", "10-19"]\ntargets = "mlp"\n')
    axes = ex.read_grid_file(f, OPTIONS)
    assert axes == {"block_size": [4, 8], "layers": ["12", "10-19"], "targets": ["mlp"]}
    points = ex.expand_grid({"block_size": 16, "layers": "all", "targets": "attn"}, axes)
    expected = [{"block_size": b, "layers": l, "targets": "mlp"} for b, l in itertools.product([4, 8], ["12", "10-19"])]
    assert points == expected


def test_grid_flags_convert_like_the_option_and_override_the_file(tmp_path):
    f = tmp_path / "grid.toml"
    f.write_text("block-size = [4, 8]\n")
    axes = ex.grid_axes(OPTIONS, f, [["block_size", "32", "64"], ["layers", "0,3,5", "all"]])
    assert axes == {"block_size": [32, 64], "layers": ["0,3,5", "all"]}


@pytest.mark.parametrize("text, message", [
    ("block_size = [4, \n", "not valid TOML"),
    ("blok_size = [4]\n", "unknown grid key 'blok_size'"),
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
        ex.read_grid_file(f, OPTIONS)


def test_missing_and_binary_grid_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ex.read_grid_file(tmp_path / "nope.toml", OPTIONS)
    f = tmp_path / "bin.toml"
    f.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not valid TOML"):
        ex.read_grid_file(f, OPTIONS)


def test_grid_flag_without_values():
    with pytest.raises(ValueError, match="at least one value"):
        ex.grid_axes(OPTIONS, None, [["block_size"]])


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
    a = ex.point_key({"layers": "12", "block_size": 16, "targets": "mlp"}, DEFAULTS)
    b = ex.point_key({"block_size": 16, "layers": "12"}, DEFAULTS)
    assert a == b == json.dumps({"layers": "12"})
    assert ex.point_key({"layers": "12", "block_size": 8}, DEFAULTS) != a


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
        ex.run_points(points, fake_measure(first, fail_after=3), results, DEFAULTS)
    assert len(first) == 3 and len(ex.finished(results)) == 3
    before = results.read_text()
    second = []
    records = ex.run_points(points, fake_measure(second), results, DEFAULTS)
    assert [p for p in second] == points[3:]             # only the unfinished points ran
    assert results.read_text().startswith(before)        # nothing written before was changed
    assert [r["point"] for r in records] == points       # all records come back, in grid order
    assert [r["metrics"]["kl_mean"] for r in records] == [p["block_size"] / 100 for p in points]
    third = []
    ex.run_points(points, fake_measure(third), results, DEFAULTS)
    assert third == []


def test_a_torn_last_line_is_recomputed_and_earlier_lines_kept(tmp_path):
    results = tmp_path / "results.jsonl"
    points = ex.expand_grid({}, {"block_size": [4, 8]})
    ex.run_points(points[:1], fake_measure([]), results, DEFAULTS)
    with open(results, "a") as f:
        f.write('{"key": "torn')                          # a kill in the middle of a write
    calls = []
    ex.run_points(points, fake_measure(calls), results, DEFAULTS)
    assert calls == points[1:]


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
