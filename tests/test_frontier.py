"""bcllm frontier: greedy mixed block sizes, bisection by measurement, the comparison at equal budgets."""

import json
from pathlib import Path

import pytest

from bcllm.experiments import runs as ex

from test_experiments import make_tiny_folder


def test_greedy_path_takes_least_damage_per_parameter_saved_and_upgrades():
    table = {(0, 4): {"damage": 0.30, "saved": 75}, (0, 16): {"damage": 0.60, "saved": 94},
             (1, 4): {"damage": 0.05, "saved": 75}, (1, 16): {"damage": 0.10, "saved": 94},
             (2, 4): {"damage": 0.10, "saved": 75}, (2, 16): {"damage": 0.90, "saved": 94}}
    path = ex.greedy_path(table)
    # rates: (1,4) .05/75; then (1,4->16) .05/19 = .0026 vs (2,4) .10/75 = .0013 -> (2,4) first
    assert path[0] == {1: 4}
    assert path[1] == {1: 4, 2: 4}
    assert path[2] == {1: 16, 2: 4}
    assert path[-1] == {0: 16, 1: 16, 2: 16}  # ends with every layer at its largest saving
    saved = [sum(table[(l, b)]["saved"] for l, b in s.items()) for s in path]
    assert saved == sorted(saved) and len(set(saved)) == len(saved)  # every move saves more


@pytest.mark.parametrize("answer", [0, 1, 7, 19, 20])
def test_longest_prefix_bisects_to_the_linear_answer(answer):
    calls = []

    def measure(state):
        calls.append(state)
        return {"token_agreement": 1.0 if state <= answer else 0.5}

    path = list(range(1, 21))  # state k = prefix k
    assert ex.longest_prefix(path, measure, 0.8, float("inf")) == answer
    assert len(calls) <= 2 * 5  # O(log n) measurements, not 20
    assert max(calls) <= max(2 * answer + 1, 1)  # galloping never measures far beyond the answer


def test_longest_prefix_past_its_deadline_still_uses_what_is_on_disk():
    calls = []

    def measure(state):
        calls.append(state)
        return {"token_agreement": 1.0 if state <= 7 else 0.5}

    path = list(range(1, 21))
    assert ex.longest_prefix(path, measure, 0.8, float("-inf")) == 0 and calls == []
    # prefixes 1-5 measured by an earlier run: the gallop (1, 3, 7, ...) reads 1 and 3, stops before 7
    assert ex.longest_prefix(path, measure, 0.8, float("-inf"), lambda state: state <= 5) == 3
    assert calls == [1, 3]
    calls.clear()  # all measured: the same answer as a search with time left
    assert ex.longest_prefix(path, measure, 0.8, float("-inf"), lambda state: True) == 7


def test_state_point_names_each_layer_and_keeps_the_default_size_plain():
    point = ex.state_point({"fit": "aware"}, {3: 4, 1: 16, 12: 8}, 16, 30)
    assert point["layers"] == "1,3,12"
    assert point["block_sizes"] == "*.layers.3.mlp.*=4,*.layers.12.mlp.*=8"


def test_frontier_cli_on_a_tiny_model(tmp_path, monkeypatch):
    from bcllm.io.checkpoint import load_fitted
    from bcllm.cli import main
    from bcllm.io.models import load_model
    from bcllm.fit.student import parse_block_sizes
    from bcllm.structures import BlockCirculantLinear

    folder = make_tiny_folder(tmp_path / "tiny")
    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    out, js = tmp_path / "run", tmp_path / "f.json"
    # 0.1: certainly met on this model (one layer at block size 8 keeps ~0.9 of the tokens; the whole
    # path ~0.75); 0.95: above even the first step's agreement, so not met
    argv = ["frontier", "--model", str(folder), "--out", str(out), "--prompts", str(folder / "prompts.txt"),
            "--min-agreement", "0.1", "0.95", "--sizes", "2,8", "--json", str(js), "--decode-bench", "eager"]
    assert main(argv) == 0
    result = json.loads(js.read_text())
    assert len(result["scan"]) == 4 * 2
    path = [dict(s) for s in result["path"]]
    assert path
    agreement = {json.dumps(sorted((int(l), b) for l, b in r["state"].items())): r["token_agreement"]
                 for r in result["curve"] if r["structure"] == "circulant"}

    def measured(k):  # token agreement measured for the path's prefix k (its state path[k - 1])
        return agreement[json.dumps(sorted(path[k - 1].items()))]

    met = [c for c in result["chosen"] if c["steps"]]
    assert [c["min_agreement"] for c in result["chosen"]] == [0.1, 0.95]
    assert met and met[0] is result["chosen"][0]  # the low floor was met: the checks below do run
    for c in result["chosen"]:
        k = c["steps"]
        assert 0 <= k <= len(path)
        if k < len(path):  # the longest prefix: the next one was measured and falls below the floor
            assert measured(k + 1) < c["min_agreement"]
    for c in met:
        k = c["steps"]
        assert {int(l): b for l, b in c["state"].items()} == path[k - 1]
        assert c["token_agreement"] >= c["min_agreement"] and c["token_agreement"] == measured(k)
        assert c["param_reduction"] > 0
        # the comparison gets at most each circulant budget: it removes at least as much
        assert c["compare"]["structure"] == "lowrank"
        assert c["compare"]["param_reduction"] >= c["param_reduction"] - 1e-9
        # the student kept when the path measured it (not fitted again) and timed against dense
        assert Path(c["student"]).parent == out / "students"
        speed = c["speed"]
        assert c["decode_speedup"] == pytest.approx(speed["compressed_decode_tokens_per_s"]
                                                    / speed["dense_decode_tokens_per_s"])
        assert speed["decode_mode"] == "eager" and speed["decode_byte_ratio"] > 1
        evaluated = tmp_path / f"eval-{c['min_agreement']:g}.json"
        assert main(["eval", "--model", str(folder), "--load", c["student"], "--max-new-tokens", "0",
                     "--prompts", str(folder / "prompts.txt"), "--json", str(evaluated)]) == 0
        assert json.loads(evaluated.read_text())["metrics"]["token_agreement"] == pytest.approx(c["token_agreement"])
        meta = json.loads(open(c["student"] + "/fitted.json").read())
        assert meta["config"]["block_sizes"] == parse_block_sizes(c["config"]["block_sizes"])
        model, _ = load_model(str(folder))
        load_fitted(model, c["student"])
        for i, layer in enumerate(model.model.layers):  # the saved student is the chosen state
            down = layer.mlp.down_proj
            if i in path[k - 1]:
                assert isinstance(down, BlockCirculantLinear) and down.block_size == path[k - 1][i]
            else:
                assert not isinstance(down, BlockCirculantLinear)
    for c in result["chosen"]:
        if not c["steps"]:  # nothing chosen, measured or saved for a floor that no step meets
            assert c["state"] == {} and not {"student", "compare", "token_agreement"} & set(c)
            assert not (out / f"student-{c['min_agreement']:g}").exists()
    reductions = [c.get("param_reduction", 0) for c in result["chosen"]]
    assert reductions == sorted(reductions, reverse=True)  # a higher floor never allows more compression
    assert (out / "frontier.md").exists() and (out / "frontier.png").exists()
    report = tmp_path / "report.md"  # bcllm report takes the same result as a section with its plot
    assert main(["report", str(out), "--out", str(report), "--frontier", str(js)]) == 0
    assert "## Frontier" in report.read_text() and (tmp_path / "report" / "frontier.png").stat().st_size > 0
    assert f"| {result['chosen'][0]['min_agreement']:.3f} |" in report.read_text()
    assert main(["report", str(out), "--out", str(report), "--frontier", str(tmp_path / "none.json")]) == 2
    lines = len((out / "results.jsonl").read_text().splitlines())
    assert main(argv) == 0  # resumable: nothing measured again
    assert len((out / "results.jsonl").read_text().splitlines()) == lines


def test_shared_input_stats_give_the_same_fits_from_one_pass():
    import copy

    import torch

    from bcllm.fit import closed_form as calibrate
    from bcllm.fit.student import StudentSpec, config_for
    from bcllm.surgery import compress_
    from conftest import tiny_model

    teacher = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 40), generator=g)} for _ in range(3)]
    passes = []
    teacher.model.layers[0].register_forward_pre_hook(lambda *a: passes.append(1))

    def fitted(layer, shared):
        student = copy.deepcopy(teacher)
        compress_(student, config_for(StudentSpec(block_size=8, layers=str(layer))))
        calibrate.fit_aware_(student, teacher, batches, progress=False)
        return student.model.layers[layer].mlp.down_proj.c.detach().clone()

    alone = [fitted(i, False) for i in (1, 3)]
    assert len(passes) == 2 * 3
    passes.clear()
    with calibrate.shared_input_stats():
        shared = [fitted(i, True) for i in (1, 3)]
    assert len(passes) == 3  # one pass over the batches for both fits
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(alone, shared))


@pytest.mark.parametrize("extra, message", [
    (["--min-agreement", "1.5"], "--min-agreement must be in (0, 1], got 1.5"),
    (["--min-agreement", "0.8", "--compare", "circulant"], "--compare must be none or a budgeted structure"),
    (["--min-agreement", "0.8", "--structure", "lowrank"], "frontier searches block-circulant block sizes"),
])
def test_frontier_refuses_bad_arguments_before_loading_a_model(tmp_path, capsys, extra, message):
    from bcllm.cli import main

    assert main(["frontier", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
