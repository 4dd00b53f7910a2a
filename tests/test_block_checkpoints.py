"""Stage checkpoints of block reconstruction: a run killed after a layer resumes there and ends
exactly where an uninterrupted run ends, without refitting the finished layers; a checkpoint of
another run, or a damaged one, is refused with an InputError naming the file."""

import copy

import pytest
import torch

from bcllm import CirculantConfig, compress_
from bcllm.errors import InputError
from bcllm.fit import closed_form, reconstruct
from bcllm.fit.reconstruct import BlockConfig, reconstruct_
from conftest import tiny_model

CFG = BlockConfig(epochs=2, lr=1e-3, batch_tokens=64)
FIT_UNIT, TRAIN_LAYER = closed_form._fit_unit, reconstruct.reconstruct_layer_


class Killed(Exception):
    pass


def setup(layers="0-2"):
    teacher = tiny_model("llama", layers=4)
    with torch.no_grad():  # MLPs that matter (random init leaves them small)
        for n, p in teacher.named_parameters():
            if ".mlp." in n:
                p.mul_(5)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8, layers=layers))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(4)]
    return teacher, student, data


def structured(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}


def counting(monkeypatch, kill_at=None):
    """Record the layers closed-form fitted and block-trained; raise Killed when layer kill_at starts."""
    fitted, trained = [], []

    def fit(unit_s, *args, **kwargs):
        fitted.append(unit_s)
        return FIT_UNIT(unit_s, *args, **kwargs)

    def train(layer, cfg):
        if layer.index == kill_at:
            raise Killed
        trained.append(layer.index)
        return TRAIN_LAYER(layer, cfg)

    monkeypatch.setattr(closed_form, "_fit_unit", fit)
    monkeypatch.setattr(reconstruct, "reconstruct_layer_", train)
    return fitted, trained


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_killed_run_resumes_after_its_last_finished_layer(tmp_path, monkeypatch, kill_at):
    teacher, student, data = setup()
    whole = copy.deepcopy(student)
    expected = reconstruct_(whole, teacher, data, CFG, progress=False)

    fitted, trained = counting(monkeypatch, kill_at)
    with pytest.raises(Killed):
        reconstruct_(student, teacher, data, CFG, progress=False, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "block").iterdir()) == [f"layer_{i:03d}.pt" for i in range(kill_at)]

    fresh = copy.deepcopy(teacher)  # a new process: the student starts over from compress_
    compress_(fresh, CirculantConfig(block_size=8, layers="0-2"))
    fitted, trained = counting(monkeypatch)
    info = reconstruct_(fresh, teacher, data, CFG, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert trained == list(range(kill_at, 3))  # the finished layers are neither trained nor fitted again
    assert len(fitted) == 3 - kill_at
    assert info["resumed_layers"] == list(range(kill_at))
    want, got = structured(whole), structured(fresh)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(want[n], got[n]), n
    strip = lambda layers: [{k: v for k, v in r.items() if k != "seconds"} for r in layers]  # noqa: E731
    assert strip(info["layers"]) == strip(expected["layers"]) and info["tokens"] == expected["tokens"]


def test_a_checkpoint_of_another_run_is_refused_and_without_resume_none_is_read(tmp_path, monkeypatch):
    teacher, student, data = setup()
    reconstruct_(copy.deepcopy(student), teacher, data, CFG, progress=False, checkpoint_dir=tmp_path)
    first = tmp_path / "block" / "layer_000.pt"
    others = [dict(cfg=BlockConfig(epochs=3, lr=1e-3, batch_tokens=64)), dict(ridge=1e-3), dict(data=data[:3]),
              dict(student=setup(layers="0-1")[1])]
    for other in others:
        with pytest.raises(InputError, match="layer_000.pt.*another run.*another checkpoint folder or resume=False"):
            reconstruct_(other.get("student", copy.deepcopy(student)), teacher, other.get("data", data),
                         other.get("cfg", CFG), other.get("ridge", 1e-4), progress=False,
                         checkpoint_dir=tmp_path, resume=True)
    fitted, trained = counting(monkeypatch)  # without resume: fitted again, files rewritten
    reconstruct_(copy.deepcopy(student), teacher, data, BlockConfig(epochs=1), progress=False, checkpoint_dir=tmp_path)
    assert trained == [0, 1, 2]
    with pytest.raises(InputError, match="other block"):  # the new files are the new run's
        reconstruct_(copy.deepcopy(student), teacher, data, CFG, progress=False, checkpoint_dir=tmp_path, resume=True)

    first.write_bytes(first.read_bytes()[:100])  # a torn file: a clear error, not a torch traceback
    with pytest.raises(InputError, match="layer_000.pt.*damaged"):
        reconstruct_(copy.deepcopy(student), teacher, data, BlockConfig(epochs=1), progress=False,
                     checkpoint_dir=tmp_path, resume=True)
