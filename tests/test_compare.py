"""`bcllm compare`: bits per weight against hand counts, rows against `bcllm eval` of the same
method, resumable points and decode timings, clear errors."""

import json

import pytest
import torch

from bcllm.cli.main import main
from bcllm.experiments import compare as cmp
from bcllm.fit.student import StudentSpec, build_student
from test_experiments import make_tiny_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def cache(tiny_folder, monkeypatch):
    monkeypatch.setenv("BCLLM_CACHE", str(tiny_folder / "cache"))


# (method, bits per weight counted by hand for the tiny Llama's MLPs: gate/up 96x64, down 64x96)
HAND_BITS = {
    # 8-bit codes, one float16 scale and zero point per row: gate/up rows have 64 inputs, down rows 96
    "int8": (8 * 3 * 6144 + 32 * (96 + 96 + 64)) / (3 * 6144),
    "int2": 2 + 32 / 32,                         # 2-bit codes, scale and zero (16 bits each) per 32 weights
    "prune-2:4": (16 + 2) / 2,                   # half the weights kept at 16 bits, a 2-bit position each
    "prune-50": 16 / 2 + 1,                      # half kept at 16 bits, a 1-bit mask over all
    "circulant-b16": 16 / 16,                    # one 16-bit real per 16 weights
    "lowrank-b16": None,                          # the rank the budget gives, counted below
}


@pytest.mark.parametrize("name", list(HAND_BITS))
def test_bits_per_weight_against_a_hand_count(name):
    from conftest import tiny_model

    model = tiny_model("llama")
    spec = StudentSpec(layers="0-1", **cmp.METHODS[name])
    _, summary = build_student(model, None, spec, progress=False)
    bits = cmp.bits_per_weight(summary)
    if name == "lowrank-b16":  # rank r: r (out + in) factors a module at 16 bits, over out * in weights
        ranks = [s["rank"] for s in summary["sizes"].values()]
        shapes = [(96, 64), (96, 64), (64, 96)] * 2
        assert bits == pytest.approx(16 * sum(r * (o + i) for r, (o, i) in zip(ranks, shapes)) /
                                     sum(o * i for o, i in shapes))
    else:
        assert bits == pytest.approx(HAND_BITS[name])


def test_int8_spectra_count_codes_at_8_bits_and_scales_at_16():
    from conftest import tiny_model

    _, summary = build_student(tiny_model("llama"), None, StudentSpec(layers="0", **cmp.METHODS["circulant-b16-int8"]),
                               progress=False)
    # per module out * in / 16 codes; a scale per frequency and output block, the planar spectra having
    # 16 / 2 = 8 frequencies (the Nyquist term's real part beside the DC term's)
    codes = 3 * 96 * 64 // 16
    scales = 8 * (96 // 16) * 2 + 8 * (64 // 16)
    assert cmp.bits_per_weight(summary) == pytest.approx((8 * codes + 16 * scales) / (3 * 96 * 64))


@pytest.mark.parametrize("name", ["int4", "prune-50", "prune-2:4", "lowrank-b16", "circulant-b16"])
def test_bits_per_weight_do_not_depend_on_the_dtype_floats_are_stored_in(name):
    from conftest import tiny_model

    bits = [cmp.bits_per_weight(build_student(tiny_model("llama").to(dtype), None,
                                              StudentSpec(layers="0", **cmp.METHODS[name]), progress=False)[1])
            for dtype in (torch.float32, torch.bfloat16)]
    assert bits[0] == pytest.approx(bits[1])


def argv(folder, out, *more):
    return ["compare", "--model", str(folder), "--out", str(out), "--prompts", str(folder / "prompts.txt"),
            "--layers", "0-1", "--fit", "frobenius", *more]


def test_compare_rows_equal_eval_of_each_method_and_rerun_measures_nothing(tiny_folder, tmp_path, cache, capsys,
                                                                           monkeypatch):
    out, js = tmp_path / "run", tmp_path / "compare.json"
    methods = "int8,int2,prune-2:4,circulant-b16,circulant-b16-int8,lowrank-b16"
    assert main(argv(tiny_folder, out, "--methods", methods, "--decode-bench", "none", "--json", str(js))) == 0
    result = json.loads(js.read_text())
    assert [r["name"] for r in result["rows"]] == methods.split(",")
    assert (out / "compare.md").read_text().count("\n| ") == len(methods.split(",")) + 2  # head, rule, rows
    assert (out / "compare.png").stat().st_size > 0
    for row in result["rows"]:  # each row is what `bcllm eval` measures for that method alone
        one = tmp_path / f"eval-{row['name']}.json"
        assert row["command"].startswith("bcllm eval ")
        assert main(row["command"].split()[1:] + ["--json", str(one)]) == 0
        alone = json.loads(one.read_text())
        assert row["token_agreement"] == pytest.approx(alone["metrics"]["token_agreement"], abs=1e-9)
        assert row["kl_mean"] == pytest.approx(alone["metrics"]["kl_mean"], rel=1e-5, abs=1e-7)
    assert result["rows"][0]["token_agreement"] > result["rows"][1]["token_agreement"]  # int8 keeps more than int2

    import bcllm.experiments.runs as runs

    monkeypatch.setattr(runs, "build_student", lambda *a, **k: pytest.fail("a finished point was measured again"))
    assert main(argv(tiny_folder, out, "--methods", methods, "--decode-bench", "none")) == 0
    assert "6 already in" in capsys.readouterr().out


def test_decode_timings_are_measured_once_and_read_back(tiny_folder, tmp_path, cache, monkeypatch):
    """Each method's own student is timed (bench model itself is tested in test_speed), once: a rerun
    reads the timings back from speeds.jsonl."""
    import bcllm.bench.measure as measure
    from bcllm.fit.closed_form import fitted_modules

    out, calib = tmp_path / "run", tmp_path / "calib.txt"
    calib.write_text("\n".join(" ".join(f"w{(11 * i + 3 * j + 5) % 120}" for j in range(9)) for i in range(12)))
    timed = []

    def fake_bench(model, compressed, ids, compile=True, **kw):
        kinds = sorted({type(m).__name__ for m in fitted_modules(compressed).values()})
        assert not fitted_modules(model) and not compile
        timed.append(kinds)
        return {"decode_speedup": float(len(timed)), "decode_mode": "eager", "decode_byte_ratio": 1.5,
                "dense_decode_tokens_per_s": 10.0, "compressed_decode_tokens_per_s": 10.0 * len(timed),
                "eager_decode_speedup": 1.0, "prefill_speedup": 1.0}

    monkeypatch.setattr(measure, "bench_model", fake_bench)
    command = argv(tiny_folder, out, "--methods", "circulant-b16,int8@sequential", "--calib", str(calib),
                   "--decode-bench", "eager")
    assert main(command) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["circulant b=16, frobenius", "int8 per row, GPTQ"]
    assert timed == [["BlockCirculantLinear"], ["QuantizedLinear"]]
    assert [r["decode_speedup"] for r in rows] == [1.0, 2.0]
    assert all((out / "students").joinpath(r["student"].rsplit("/", 1)[-1], "fitted.json").is_file() for r in rows)
    assert len((out / cmp.SPEEDS).read_text().splitlines()) == 2

    assert main(command) == 0  # a rerun times nothing
    assert len(timed) == 2
    assert [r["decode_speedup"] for r in json.loads((out / "compare.json").read_text())["rows"]] == [1.0, 2.0]

    import shutil  # points measured before their students were kept (or timed): fitted again, then timed
    shutil.rmtree(out / "students")
    (out / cmp.SPEEDS).unlink()
    assert main(command) == 0
    assert timed[2:] == [["BlockCirculantLinear"], ["QuantizedLinear"]]
    assert all((out / "students").joinpath(r["student"].rsplit("/", 1)[-1], "fitted.json").is_file() for r in rows)


def test_quantization_options_reach_the_quant_methods_only(tiny_folder, tmp_path, cache):
    js = tmp_path / "compare.json"
    assert main(argv(tiny_folder, tmp_path / "run", "--methods", "int2,circulant-b16", "--quant-grid", "int",
                     "--decode-bench", "none", "--json", str(js))) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["int2 group 32, zero-inside grid, round to nearest",
                                           "circulant b=16, frobenius"]
    assert "--quant-grid int" in rows[0]["command"] and "--quant-grid" not in rows[1]["command"]


@pytest.mark.parametrize("methods,message", [("int9", "unknown method 'int9'"),
                                             ("int8@fast", "unknown fit 'fast'"),
                                             ("int8@", "unknown fit ''"),
                                             (",", "--methods is empty")])
def test_bad_methods_are_refused_before_the_model_loads(tmp_path, capsys, methods, message):
    assert main(argv(tmp_path / "no-model", tmp_path / "run", "--methods", methods)) == 2
    assert message in capsys.readouterr().err


def test_structure_options_are_refused(tmp_path, capsys):
    assert main(argv(tmp_path / "no-model", tmp_path / "run", "--block-size", "8")) == 2
    assert "compare sets the structure and size of each method" in capsys.readouterr().err
