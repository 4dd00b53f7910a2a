"""The student pipeline below the CLI: specs, the structure registry, errors that name
parameters, and results directories written by the earlier layout."""

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from bcllm import InputError, StudentIO, StudentSpec, build_student, compress_
from bcllm.experiments import runs as ex
from bcllm.structures import StructuredLinear, factory, linear_weight
from bcllm.structures import StructureConfig, register
from conftest import tiny_model

DATA = Path(__file__).parent / "data"


# ---- a new structure, added by touching one file (this one): module, config, registration ----
# (the 39 lines between the markers, 30 of them not blank, are all it takes)
# >>> toy structure
class DiagonalLinear(StructuredLinear):
    """W_hat = diag(d) on the leading min(out, in) channels: out parameters."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.d = nn.Parameter(torch.zeros(min(in_features, out_features), **factory(device, dtype)))

    @classmethod
    def from_linear(cls, linear):
        layer = cls(**cls.dense_args(linear))
        with torch.no_grad():
            layer.d.copy_(linear_weight(linear).diagonal())
        layer.copy_bias_(linear)
        return layer

    def to_dense(self):
        return torch.eye(self.out_features, self.in_features, dtype=self.d.dtype) * torch.cat(
            [self.d, self.d.new_zeros(self.out_features - self.d.numel())])[:, None]

    def forward(self, x):
        return self.add_bias(nn.functional.linear(x, self.to_dense().to(x.dtype)))

    def sizes(self):
        return {}


@register("diagonal")
@dataclass
class DiagonalConfig(StructureConfig):
    targets: str = "mlp"
    layers: str | None = None
    module = DiagonalLinear

    @classmethod
    def from_options(cls, size, rank, **where):
        return cls(**where)

    def size_for(self, name, out_features, in_features):
        return {}
# <<< toy structure


def teardown_module():
    from bcllm.structures import STRUCTURES

    STRUCTURES.pop("diagonal")  # the toy structure is this file's, not the other tests'


def test_a_structure_registered_in_one_file_works_everywhere(tmp_path):
    from bcllm.io.checkpoint import load_fitted
    from bcllm.cli import build_parser

    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions
                   if a.dest == "structure").choices
    assert "diagonal" in choices
    teacher = tiny_model("llama", layers=2)
    student, summary = build_student(teacher, None, StudentSpec(structure="diagonal", layers="1"),
                                     StudentIO(save=str(tmp_path / "s")))
    mlp = student.model.layers[1].mlp
    assert isinstance(mlp.up_proj, DiagonalLinear) and summary["structured_params"] == 3 * 64  # min(in, out) each
    assert torch.equal(mlp.up_proj.to_dense().diagonal(), teacher.model.layers[1].mlp.up_proj.weight.diagonal())
    fresh = copy.deepcopy(teacher)
    load_fitted(fresh, tmp_path / "s")  # checkpoint loading finds the config through the registry
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(fresh(ids).logits, student(ids).logits)
    lines = (Path(__file__).read_text().split("# >>> toy structure")[1].split("# <<< toy structure")[0]
             .strip().splitlines())
    assert len(lines) <= 40


def test_spec_is_frozen_serialisable_and_checked():
    spec = StudentSpec(layers="10-19", fit="sequential")
    with pytest.raises(AttributeError):
        spec.fit = "aware"
    assert json.loads(json.dumps(spec.__dict__))["layers"] == "10-19"
    with pytest.raises(InputError, match="unknown fit 'nope'") as e:
        StudentSpec(fit="nope")
    assert e.value.param == "fit"
    with pytest.raises(InputError, match="unknown structure 'sparse'"):
        StudentSpec(structure="sparse")
    with pytest.raises(InputError, match="calib_samples must be >= 1") as e:
        StudentSpec(calib_samples=0)
    assert e.value.param == "calib_samples"


def test_build_student_leaves_the_model_and_equals_compress():
    teacher = tiny_model("llama", layers=2)
    state = copy.deepcopy(teacher.state_dict())
    student, summary = build_student(teacher, None, StudentSpec(block_size=8, layers="0-1"))
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    reference = copy.deepcopy(teacher)
    from bcllm import CirculantConfig

    compress_(reference, CirculantConfig(block_size=8, layers="0-1", targets="mlp"))
    ids = torch.randint(0, 128, (2, 5))
    assert torch.equal(student(ids).logits, reference(ids).logits)
    assert summary["sizes"]["model.layers.0.mlp.up_proj"] == {"block_size": 8}


def test_output_options_are_refused_as_grid_keys():
    with pytest.raises(InputError, match="'save' is an output option"):
        ex.grid_axes(None, [["save", "out/x"]])
    with pytest.raises(InputError, match="'resume' is an output option"):
        ex.grid_axes(None, [["resume", "true"]])
    assert ex.grid_axes(None, [["distill_steps", "5"], ["train_norms", "true"]]) == {
        "distill_steps": [5], "train_norms": [True]}


def test_cli_names_the_flag_of_a_library_parameter(capsys):
    from bcllm.cli import main

    assert main(["compress", "--block-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "bcllm compress: error: --block-size must be >= 1, got 0"
    assert main(["compress", "--structure", "blockdiag", "--rank", "3"]) == 2
    assert "--rank applies to lowrank and hybrid, not blockdiag" in capsys.readouterr().err


def test_an_internal_bug_is_not_reported_as_a_usage_error(monkeypatch, tmp_path):
    """A plain ValueError from deep inside is a bug: its traceback reaches the user, not exit status 2."""
    import bcllm.fit.student
    from bcllm.cli import main

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    from test_experiments import make_tiny_folder

    monkeypatch.setattr(bcllm.fit.student, "build_student", broken)
    folder = make_tiny_folder(tmp_path / "tiny")
    with pytest.raises(ValueError, match="an internal bug"):
        main(["compress", "--model", str(folder)])


def test_results_directory_of_the_earlier_layout_resumes_without_recomputing(tmp_path, monkeypatch):
    """results.jsonl written by bcllm before the pipeline existed (tests/data/old_layout, a 16-point
    sweep made with the earlier CLI): the same sweep today measures no point again."""
    import bcllm.eval.metrics
    from bcllm.cli import main
    from test_experiments import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    run = tmp_path / "run"
    run.mkdir()
    manifest = json.loads((DATA / "old_layout" / "manifest.json").read_text())
    manifest["identity"].update(model=str(folder), prompts=str(folder / "prompts.txt"))
    (run / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(DATA / "old_layout" / "results.jsonl", run / "results.jsonl")
    shutil.copy(DATA / "old_layout" / "calib.txt", tmp_path / "calib.txt")
    monkeypatch.chdir(tmp_path)  # the old run named its calibration file "calib.txt"
    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(bcllm.eval.metrics, "evaluate", lambda *a, **k: calls.append(1))
    argv = ["sweep", "--model", str(folder), "--out", str(run), "--prompts", str(folder / "prompts.txt"),
            "--max-new-tokens", "3", "--calib", "calib.txt", "--calib-samples", "8", "--grid", "block_size", "2", "8",
            "--grid", "layers", "0", "1-2", "--grid", "fit", "frobenius", "aware", "--grid", "structure", "circulant",
            "lowrank"]
    assert main(argv) == 0
    assert calls == []
    assert len(ex.finished(run / "results.jsonl")) == 16


def test_point_keys_keep_their_meaning_when_defaults_change():
    from bcllm.fit.student import KEY_DEFAULTS, POINT_FIELDS

    assert set(KEY_DEFAULTS) == set(POINT_FIELDS)  # every setting has the default it was first written with
    # an uncalibrated Frobenius point names no calibration setting: results from before `mix` still match
    assert ex.point_key(StudentSpec(layers="12").point()) == json.dumps({"layers": "12"})
    # a calibrated point under today's defaults is not the old self-chat/96 point
    key = json.loads(ex.point_key(StudentSpec(layers="12", fit="aware").point()))
    assert key == {"calib": "teacher", "calib_samples": None, "fit": "aware", "fit_samples": 320, "layers": "12"}
    # the recipe resolves its distillation steps; the block settings appear only with fit="block"
    assert StudentSpec(fit="block").point()["distill_steps"] == 100
    assert StudentSpec(fit="aware", block_epochs=9).point()["block_epochs"] == KEY_DEFAULTS["block_epochs"]
