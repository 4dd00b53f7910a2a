"""Data parallelism (bcllm.dist): two gloo processes, each with its share of the calibration data,
give what one process gives on all of it (statistics, fitted weights, distillation losses); a
failing or missing rank ends the run with a message, never a hang."""

import copy
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_model

WORLD = 2
NAMES = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"]


def token_batches(sizes, seed, length=12):
    """Right-padded random token batches of the given row counts (a few rows padded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, rows in enumerate(sizes):
        ids = torch.randint(0, 128, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length - 1 - i % 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def fitted_state(student):
    from bcllm.fit.closed_form import fitted_modules

    return {f"{n}.{k}": v.detach().clone() for n, m in fitted_modules(student).items()
            for k, v in m.state_dict().items()}


def compressed(teacher):
    from bcllm import CirculantConfig, compress_

    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8, targets="mlp", layers="1-2"))
    return student


def distilled(student, teacher, sizes=(4, 3, 1), held=(3,), **settings) -> dict:
    """Losses, held-out KL and weights of a few distillation steps on batches of 4, 3 and 1 rows (the
    last one leaves a rank without rows), on-policy batches drawn from a seeded generator."""
    from bcllm.fit.distill import DistillConfig, distill_

    student = copy.deepcopy(student)
    g = torch.Generator().manual_seed(7)
    cfg = DistillConfig(steps=6, lr=1e-2, eval_every=2, seed=1, **settings)
    out = distill_(student, teacher, token_batches(sizes, 3), token_batches(held, 4), cfg, progress=False,
                   on_policy=lambda: token_batches([3], int(torch.randint(0, 1000, (1,), generator=g)))[0])
    return {"loss": out["loss"], "held_out_kl": [kl for _, kl in out["held_out_kl"]],
            "weights": fitted_state(student)}


def everything() -> dict:
    """Every data-parallel computation, run the same way alone and on each rank."""
    from bcllm.fit.closed_form import fit_aware_, fit_sequential_, input_stats
    from bcllm.fit.reconstruct import BlockConfig, reconstruct_

    torch.set_num_threads(1)
    teacher = tiny_model("llama", layers=3)
    batches = token_batches([3, 2, 3, 3, 1], 0)
    stats = input_stats(teacher, NAMES, batches, progress=False)
    out = {"stats": {n: (s.xx, s.xt, s.n) for n, s in stats.items()}}
    for name, fit in (("aware", fit_aware_), ("sequential", fit_sequential_)):
        student = compressed(teacher)
        info = fit(student, teacher, batches, 1e-4, False)
        out[name] = {"weights": fitted_state(student), "tokens": info["tokens"]}
    student = compressed(teacher)
    info = reconstruct_(student, teacher, batches, BlockConfig(epochs=1, batch_tokens=8), progress=False)
    out["block"] = {"weights": fitted_state(student), "held_after": [r["held_after"] for r in info["layers"]]}
    out["block_rows"] = [r["train_rows"] for r in info["layers"]]  # token rows this rank trained on
    # (one case without the cached prefix: both forward paths are split over ranks; one with batches
    # and held-out text of one row: rank 0 has no rows of any, the held-out KL and vocabulary still sum)
    for name, settings in (("forward", dict(hidden_mse=0.5, onpolicy=0.3, cache_prefix=False)),
                           ("reverse", dict(divergence="reverse")), ("teacher_vocab", dict(vocab="teacher")),
                           ("one_row", dict(vocab="teacher", hidden_mse=0.5, sizes=(1, 1), held=(1,)))):
        out[f"distill_{name}"] = distilled(student, teacher, **settings)
    return out


def run_rank(rank, init, folder):
    from bcllm import dist

    dist.init(init, rank_id=rank, world_size=WORLD, timeout=60)
    torch.save(everything(), f"{folder}/rank{rank}.pt")


def spawn(fn, args, deadline_s=240):
    """torch.multiprocessing.spawn of WORLD processes, joined with a deadline (a hang fails the test)."""
    context = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    end = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > end:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {deadline_s} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process on all the data, [what each of the two ranks computed])."""
    folder = tmp_path_factory.mktemp("dist")
    alone = everything()
    spawn(run_rank, (f"file://{folder}/init", str(folder)))
    return alone, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def close(a, b, tol=1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            close(a[k], b[k], tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y, tol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    else:
        assert b == pytest.approx(a, rel=tol, abs=tol)


@pytest.mark.parametrize("part", ["stats", "aware", "sequential", "block"])
def test_two_ranks_fit_what_one_process_fits(runs, part):
    alone, ranks = runs
    for rank in ranks:
        close(alone[part], rank[part])


def test_block_reconstruction_splits_each_chunk_over_the_ranks(runs):
    alone, ranks = runs  # (the weights and held-out errors equal the single process's: the test above)
    assert all(n > 0 for n in alone["block_rows"])
    assert [a + b for a, b in zip(ranks[0]["block_rows"], ranks[1]["block_rows"])] == alone["block_rows"]
    assert all(0 < r < a for rank in ranks for r, a in zip(rank["block_rows"], alone["block_rows"]))


def test_the_statistics_count_every_token_once(runs):
    alone, ranks = runs
    tokens = sum(int(b["attention_mask"].sum()) for b in token_batches([3, 2, 3, 3, 1], 0))
    assert {s[2] for s in alone["stats"].values()} == {tokens}
    assert ranks[0]["sequential"]["tokens"] == ranks[1]["sequential"]["tokens"] == tokens


@pytest.mark.parametrize("kind", ["forward", "reverse", "teacher_vocab", "one_row"])
def test_distillation_split_over_ranks_gives_the_whole_batch_losses(runs, kind):
    alone, ranks = runs
    for rank in ranks:
        close(alone[f"distill_{kind}"]["loss"], rank[f"distill_{kind}"]["loss"])
        close(alone[f"distill_{kind}"]["held_out_kl"], rank[f"distill_{kind}"]["held_out_kl"])
        close(alone[f"distill_{kind}"]["weights"], rank[f"distill_{kind}"]["weights"], 1e-4)
    close(ranks[0][f"distill_{kind}"]["weights"], ranks[1][f"distill_{kind}"]["weights"], 0)


def test_a_launchers_rank_without_a_world_is_one_process(monkeypatch, tmp_path):
    """RANK set (Kubeflow and the like) but no WORLD_SIZE: one process, which writes its files."""
    from bcllm import dist
    from bcllm.io.results import atomic_write

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (dist.world(), dist.rank(), dist.local_rank(), dist.is_main()) == (1, 0, 0, True)
    atomic_write(tmp_path / "out.txt", "written")
    assert (tmp_path / "out.txt").read_text() == "written"


def test_alone_every_helper_is_a_no_op(monkeypatch):
    from bcllm import dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    batches = token_batches([2, 2], 0)
    assert (dist.world(), dist.rank(), dist.is_main()) == (1, 0, True)
    assert dist.shard(batches) == batches and dist.split_rows(batches[0]) is batches[0]
    t = torch.ones(3)
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()
    assert not dist.init()


def test_shards_split_batches_and_rows_deterministically(monkeypatch):
    from bcllm import dist
    from bcllm.errors import InputError

    batches = token_batches([5, 1, 2], 0)
    shards, rows = [], []
    for r in range(WORLD):
        monkeypatch.setenv("WORLD_SIZE", str(WORLD))
        monkeypatch.setenv("RANK", str(r))
        shards.append(dist.shard(batches))
        rows.append(dist.split_rows(batches[0])["input_ids"])
    assert [len(s) for s in shards] == [2, 1] and shards[0][1] is batches[2]
    assert torch.equal(torch.cat(rows), batches[0]["input_ids"]) and [len(r) for r in rows] == [2, 3]
    with pytest.raises(InputError, match="1 calibration batches for 2 processes"):
        dist.shard(batches[:1])


def fail_rank(rank, init, how):
    from bcllm import dist

    dist.init(init, rank_id=rank, world_size=WORLD, timeout=3)
    if rank == 1:
        if how == "raise":
            raise ValueError("rank 1 broke")
        time.sleep(120)  # never arrives
    dist.all_reduce_sum(torch.ones(1))


@pytest.mark.parametrize("how,message", [("raise", "rank 1 broke|another rank failed"),
                                         ("hang", "rank 0 of 2: summing a tensor over ranks failed.*did not arrive")])
def test_a_failing_or_missing_rank_ends_the_run_with_a_message(tmp_path, how, message):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match=message):
        spawn(fail_rank, (f"file://{tmp_path}/init", how), deadline_s=90)
    assert time.monotonic() - start < 90


def main_fails(rank, init, folder):
    """Rank 0 raises an InputError inside main_first, then inside an on_main writer; each rank records
    what it raised and how long it took."""
    from bcllm import dist
    from bcllm.errors import InputError

    dist.init(init, rank_id=rank, world_size=WORLD, timeout=120)

    @dist.on_main
    def write():
        raise InputError("rank 0 could not write", "out")

    def in_main_first():
        with dist.main_first():
            if dist.is_main():
                raise InputError("rank 0 could not make the cache", "cache")

    seen = []
    for block in (in_main_first, write):
        start = time.monotonic()
        try:
            block()
            seen.append(None)
        except Exception as e:
            seen.append((type(e).__name__, str(e), getattr(e, "param", None), time.monotonic() - start))
    torch.save(seen, f"{folder}/rank{rank}.pt")


def test_an_error_on_rank_0_is_raised_on_every_rank_at_once(tmp_path):
    spawn(main_fails, (f"file://{tmp_path}/init", str(tmp_path)), deadline_s=90)
    for rank in range(WORLD):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert [s[:3] for s in seen] == [("InputError", "rank 0 could not make the cache", "cache"),
                                        ("InputError", "rank 0 could not write", "out")]
        assert all(s[3] < 20 for s in seen)  # at once, not after the 120 s timeout


def test_ranks_other_than_0_print_no_progress_bars_but_their_errors():
    """silence_progress_bars (one_voice on ranks > 0): no bar draws, nested or not, even where the
    call says disable=False; lines printed to stderr in several writes keep their newlines."""
    import subprocess
    import sys

    code = """if True:
        import sys
        from tqdm.auto import tqdm
        from bcllm.cli.main import silence_progress_bars
        silence_progress_bars()
        silence_progress_bars()  # (twice: still one wrapper)
        for _ in tqdm(range(3), desc="outer", disable=False, mininterval=0):
            for _ in tqdm(range(3), desc="inner", leave=False, mininterval=0):
                pass
        print("bcllm rank 1 of 2: error: a", file=sys.stderr)
        print("bcllm rank 1 of 2: error: b", file=sys.stderr)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "bcllm rank 1 of 2: error: a\nbcllm rank 1 of 2: error: b\n"
