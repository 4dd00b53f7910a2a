"""Experiments: per-layer sensitivity scans, budgeted layer selection and grid sweeps.

A *point* is a dict of student settings: fields of pipeline.StudentSpec (block_size, layers,
targets, fit, structure, ...). The sweep knows nothing about any one structure: each point's
student is built by pipeline.build_student and measured by evaluate() against teacher
outputs computed once per run. Output options (pipeline.StudentIO) are never point settings.

A results directory holds
  manifest.json  model, prompts and evaluation settings (a directory never mixes models)
  results.jsonl  one record per finished point, appended at once, never rewritten
  budget.jsonl   one record per budgeted selection (prediction, measurement, naive baseline)
  floors.jsonl   the floor (same modules removed) of each module set measured
Scan, budget and sweep share results.jsonl: a point measured by any of them is not measured again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import dist
from ..errors import InputError
from ..io.models import DEFAULT_MODEL
from ..fit.student import KEY_DEFAULTS, POINT_FIELDS, StudentIO, StudentSpec, build_student, spec_value
from ..io.results import (append_jsonl, command_line, library_versions, read_jsonl, versions, with_current_keys,
                          write_json)
from ..surgery import parse_layers

RESULTS = "results.jsonl"
BUDGETS = "budget.jsonl"
MANIFEST = "manifest.json"
FLOORS = "floors.jsonl"


# ---------------------------------------------------------------- grid

def read_grid_file(path) -> dict[str, list]:
    """Axes {key: [values]} of a TOML grid file: `key = [v1, v2]` is an axis, `key = v` a fixed value."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"grid file {str(path)!r} does not exist", "grid_file") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"grid file {str(path)!r} is not valid TOML: {e}", "grid_file") from None
    axes = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise InputError(f"grid file {str(path)!r}: [{key}] tables are not allowed; write "
                             f"`key = value` or `key = [value, ...]` at top level", "grid_file")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise InputError(f"grid file {str(path)!r}: {key!r} is an empty list", "grid_file")
        axes[key.replace("-", "_")] = [spec_value(key.replace("-", "_"), v) for v in values]
    return axes


def grid_axes(grid_file=None, grid_flags=()) -> dict[str, list]:
    """Axes from a TOML file, then (KEY, V, ...) lists such as the CLI's `--grid` (a list
    replaces the file's axis). Keys are StudentSpec fields; output options are refused."""
    axes = read_grid_file(grid_file) if grid_file else {}
    for flag in grid_flags or ():
        key, *values = flag
        if not values:
            raise InputError(f"grid axis {key}: give at least one value, e.g. block_size 8 16 32", "grid")
        axes[key.replace("-", "_")] = [spec_value(key.replace("-", "_"), v) for v in values]
    return axes


def expand_grid(base: dict, axes: dict[str, list]) -> list[dict]:
    """Cartesian product of the axes over a base point, in axis order (first axis slowest)."""
    keys = list(axes)
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(axes[k] for k in keys))]


def layers_spec(spec, num_layers: int) -> str:
    """Canonical layer string: 'all', '12', '10-19', '0-3,8' (so '10-19' and '10,11,...' are one point)."""
    indices = parse_layers(spec, num_layers)
    if indices is None or indices == list(range(num_layers)):
        return "all"
    runs, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(runs)


def num_patched_layers(spec: str, num_layers: int) -> int:
    indices = parse_layers(spec, num_layers)
    return num_layers if indices is None else len(indices)


def canonical(point: dict, num_layers: int) -> dict:
    point = dict(sorted(point.items()))
    if "layers" in point:
        point["layers"] = layers_spec(point["layers"], num_layers)
    return point


def point_key(point: dict, defaults: dict = KEY_DEFAULTS) -> str:
    """Identity of a point: its settings that differ from pipeline.KEY_DEFAULTS (so a setting
    added to bcllm later, with its default, does not orphan the results already on disk)."""
    return json.dumps({k: v for k, v in sorted(point.items()) if k not in defaults or v != defaults[k]},
                      sort_keys=True)


# ---------------------------------------------------------------- results directory

# Identity keys added since the first manifests, with the value every earlier run had. Other keys
# an old manifest lacks (weights_sha256, library versions) are recorded when it is next opened.
LEGACY_IDENTITY = {"seed": 0, "device": "cpu"}


def point_hash(point: dict) -> str:
    """A short name for a point's files (checkpoint folder, kept student): its key's sha256."""
    return hashlib.sha256(point_key(point).encode()).hexdigest()[:16]


def open_results_dir(out, identity: dict) -> Path:
    """Create `out` with a manifest, or check that the manifest there describes the same run.

    identity: what makes results comparable (model, prompts, evaluation settings). A directory
    made for another model or prompt set is refused, so results are never mixed. Under torchrun
    rank 0 makes it first; the other ranks then check its manifest."""
    with dist.main_first():
        return _open_results_dir(out, identity)


def _open_results_dir(out, identity: dict) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out {str(out)!r} is a file; give a directory for the results", "out")
    if not out.parent.is_dir():
        raise InputError(f"cannot create {str(out)!r}: directory {str(out.parent)!r} does not exist", "out")
    out.mkdir(exist_ok=True)
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            meta = json.loads(manifest.read_text())
            old = meta["identity"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{manifest} is not a bcllm manifest; use another results directory", "out") from None
        for key in sorted(set(old) | set(identity)):
            if key not in old and key not in LEGACY_IDENTITY:
                continue  # not recorded when the directory was made
            before = old.get(key, LEGACY_IDENTITY.get(key))
            if before != identity.get(key):
                raise InputError(f"{str(out)!r} holds results for {key}={before!r}, but this run has "
                                 f"{key}={identity.get(key)!r}; use another results directory", "out")
        if set(identity) - set(old):  # a manifest from before these keys existed: recorded from now on
            write_json(manifest, {**meta, "identity": {**identity, **old}})
    elif any(out.iterdir()):
        raise InputError(f"{str(out)!r} is not empty and has no {MANIFEST}: not a bcllm results "
                         f"directory; use an empty or new results directory", "out")
    else:
        write_json(manifest, {"identity": identity, "versions": versions(), "command": command_line(),
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out


def finished(results_path, rekey=None) -> dict[str, dict]:
    """{point key: record} of the points already measured. rekey(point) -> key: a record is also
    found under the key its stored point has today (records whose keys were written with settings
    that have since been found not to matter)."""
    records = [with_current_keys(r) for r in read_jsonl(results_path) if "key" in r]
    done = {r["key"]: r for r in records}
    if rekey is not None:
        for r in records:
            done.setdefault(rekey(r["point"]), r)
    return done


def end_torn_line(path) -> None:
    """A kill mid-write leaves a last line without its newline: end it, so that the next record
    starts on a line of its own (the torn line is kept, and skipped by read_jsonl)."""
    path = Path(path)
    if dist.is_main() and path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def run_points(points: list[dict], measure, results_path, defaults: dict = KEY_DEFAULTS,
               desc: str = "points", rekey=None) -> list[dict]:
    """Measure each point not yet in results_path, appending its record at once; return the
    records of all `points` (finished ones read back, not recomputed; rekey: see finished)."""
    from tqdm import tqdm

    end_torn_line(results_path)
    done = dist.broadcast_object(finished(results_path, rekey))  # torchrun: rank 0's records on every rank
    keys = list(dict.fromkeys(point_key(p, defaults) for p in points))  # drop duplicate points
    by_key = {point_key(p, defaults): p for p in points}
    todo = [k for k in keys if k not in done]
    print(f"{desc}: {len(keys)} points, {len(keys) - len(todo)} already in {results_path}, {len(todo)} to run")
    for key in tqdm(todo, desc=desc, unit="point", dynamic_ncols=True):
        done.update(finished(results_path, rekey))  # another process on the same directory may have done it
        found = dist.broadcast_object(done.get(key))  # torchrun: every rank skips the points rank 0 skips
        if found is not None:
            done[key] = found
            continue
        start = time.perf_counter()
        record = measure(by_key[key])
        record = {"key": key, "point": by_key[key], **record, "time_s": round(time.perf_counter() - start, 2),
                  "command": command_line()}
        record = dist.broadcast_object(record)  # torchrun: rank 0's on every rank (branches on its metrics agree)
        append_jsonl(results_path, record)
        done[key] = record
    return [done[k] for k in keys]


# ---------------------------------------------------------------- scan and budget

def scan_points(base: dict, layers: list[int], module_suffixes=None) -> list[dict]:
    """One point per decoder layer (or per layer and module suffix) with everything else from base."""
    if module_suffixes:
        return [{**base, "layers": str(i), "targets": s} for i in layers for s in module_suffixes]
    return [{**base, "layers": str(i)} for i in layers]


BUDGET_KINDS = {"params": "parameter reduction to reach (fraction of the model's parameters)",
                "agreement": "token_agreement floor", "kl": "kl_mean ceiling"}


def parse_budget(spec: str) -> tuple[str, float]:
    kind, sep, value = spec.partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS:
        raise InputError(f"budget {spec!r}: write KIND=VALUE with KIND one of "
                         + "; ".join(f"{k} ({v})" for k, v in BUDGET_KINDS.items()) + ", e.g. params=0.3")
    try:
        target = float(value)
    except ValueError:
        raise InputError(f"budget {spec!r}: {value!r} is not a number") from None
    if kind in ("params", "agreement") and not 0 < target <= 1:
        raise InputError(f"budget {spec!r}: {kind} must be in (0, 1]")
    if kind == "kl" and not target > 0:
        raise InputError(f"budget {spec!r}: kl must be > 0")
    return kind, target


def predict(rows: list[dict]) -> dict:
    """First-order prediction for patching several layers at once: their damages add."""
    return {"kl_mean": sum(r["kl_mean"] for r in rows),
            "token_agreement": max(0.0, 1 - sum(1 - r["token_agreement"] for r in rows)),
            "saved_params": sum(r["saved_params"] for r in rows)}


def select_budget(table: list[dict], kind: str, target: float, model_params: int) -> list[dict]:
    """Greedy choice from a sensitivity table.

    table rows: {"layer", "kl_mean", "token_agreement", "saved_params"} (one per scanned layer).
    Layers are taken in order of least damage per parameter saved (kl_mean, or the agreement
    drop for an agreement floor): until the parameter reduction reaches `target` (params), or
    while the predicted token_agreement stays >= target (agreement) / kl_mean <= target (kl)."""
    def damage(r):
        return (1 - r["token_agreement"]) if kind == "agreement" else r["kl_mean"]

    order = sorted(table, key=lambda r: (damage(r) / max(r["saved_params"], 1), r["layer"]))
    chosen = []
    for row in order:
        if kind == "params":
            if predict(chosen)["saved_params"] >= target * model_params:
                break
            chosen.append(row)
        else:
            trial = predict(chosen + [row])
            if (kind == "agreement" and trial["token_agreement"] < target) or (kind == "kl" and trial["kl_mean"] > target):
                break
            chosen.append(row)
    if kind == "params" and predict(chosen)["saved_params"] < target * model_params:
        reach = predict(table)["saved_params"] / model_params
        raise InputError(f"budget params={target} is out of reach: patching every scanned layer removes "
                         f"only {reach:.3f} of the model's parameters")
    if not chosen:
        best = order[0] if order else None
        raise InputError(f"budget {kind}={target} admits no layer: the least sensitive one alone gives "
                         + (f"token_agreement {best['token_agreement']:.3f}, kl_mean {best['kl_mean']:.3f}"
                            if best else "nothing (empty scan)"))
    return sorted(chosen, key=lambda r: r["layer"])


def contiguous_windows(k: int, num_layers: int) -> dict[str, str]:
    """The naive alternatives to a selection of k layers: the first, middle and last k layers."""
    mid = (num_layers - k) // 2
    windows = {"first": (0, k - 1), "middle": (mid, mid + k - 1), "last": (num_layers - k, num_layers - 1)}
    return {name: layers_spec(f"{a}-{b}", num_layers) for name, (a, b) in windows.items()}


# ---------------------------------------------------------------- Pareto front

def pareto_front(records: list[dict], x: str, y: str, maximize_y: bool) -> list[dict]:
    """Records not dominated in (larger x, better y), sorted by x."""
    front = []
    best = None
    for r in sorted(records, key=lambda r: (-r[x], -r[y] if maximize_y else r[y])):
        value = r[y] if maximize_y else -r[y]
        if best is None or value > best:
            front.append(r)
            best = value
    return sorted(front, key=lambda r: r[x])


# ---------------------------------------------------------------- runs (cli.py parses, these run)

@dataclass(frozen=True)
class EvalSettings:
    """What a run is measured on: the model, the prompts and the evaluation options, shared by all
    its points (the results directory's identity)."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    prompts: str | None = None          # a prompt file; None: the bundled 100 prompts
    max_new_tokens: int = 32
    chat: bool = False


class Session:
    """What a scan or sweep shares across its points: the model, prompts, teacher outputs and
    results directory, all prepared once; `base` is the spec every point starts from."""

    def __init__(self, settings: EvalSettings, out, base: StudentSpec, io: StudentIO = StudentIO()):
        import torch

        from ..eval.metrics import TeacherCache
        from ..io.models import load_model, model_file_identity, model_fingerprint
        from ..io.prompts import load_prompts
        from ..surgery import decoder_layers, num_params

        self.start = time.perf_counter()
        self.with_floor = True  # measure each point's floor (same modules removed) beside it
        self.save_students = False  # save each measured student under out/students/<point hash>
        self.settings, self.base, self.io = settings, base, dataclasses.replace(io, save=None, load=None)
        self.prompts = load_prompts(settings.prompts)
        torch.manual_seed(settings.seed)
        self.model, self.tokenizer = load_model(settings.model, dtype=settings.dtype, device=settings.device)
        self.num_layers = len(decoder_layers(self.model)[1])
        self.model_params = num_params(self.model)
        identity = {"model": settings.model, "dtype": settings.dtype, "model_params": self.model_params,
                    "num_layers": self.num_layers, "prompts": str(settings.prompts or "bundled prompts_100.txt"),
                    "prompts_sha256": hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16],
                    "num_prompts": len(self.prompts), "max_new_tokens": settings.max_new_tokens,
                    "chat": settings.chat, "seed": settings.seed, "device": settings.device,
                    "weights_sha256": model_fingerprint(self.model, full=True),
                    **library_versions()}
        self.out = open_results_dir(out, identity)
        self.results = self.out / RESULTS
        # The teacher runs once for all points (and is cached on disk across runs).
        self.teacher = TeacherCache.build(self.model, self.tokenizer, self.prompts,
                                          max_new_tokens=settings.max_new_tokens, chat=settings.chat,
                                          model_id=model_file_identity(settings.model))

    def base_point(self) -> dict:
        """The base spec's point fields as given (grid values go over these before `effective`)."""
        return canonical({k: getattr(self.base, k) for k in POINT_FIELDS}, self.num_layers)

    def measure(self, point: dict) -> dict:
        """Build the student for one point (pipeline.build_student) and evaluate it against the teacher."""
        import torch

        from ..eval import metrics as ev

        torch.manual_seed(self.settings.seed)
        spec = dataclasses.replace(self.base, **point)
        io = self.io
        if io.distill_dir:  # one checkpoint folder per point: a point never resumes another's run
            io = dataclasses.replace(io, distill_dir=str(Path(io.distill_dir) / f"point-{point_hash(point)}"))
        if self.save_students:  # kept, so a chosen student need not be fitted again
            io = dataclasses.replace(io, save=str(self.student_dir(point)))
        student, summary = build_student(self.model, self.tokenizer, spec, io, eval_prompts=self.prompts,
                                         model_id=self.settings.model, progress=False)
        result = ev.evaluate(student, self.tokenizer, self.prompts, teacher=self.teacher, progress=False)
        metrics = result["metrics"]
        if self.with_floor:
            metrics = ev.with_floor(metrics, self.floor(summary["modules"]))
        return {"metrics": metrics, "ci": result["ci"], "compression": summary,
                "param_reduction": (summary["model_params_before"] - summary["model_params_after"])
                / summary["model_params_before"],
                "num_layers": num_patched_layers(point.get("layers", "all"), self.num_layers)}

    def student_dir(self, point: dict) -> Path:
        """Where save_students keeps the student of `point` (a point as measure() receives it)."""
        return self.out / "students" / point_hash(point)

    def floor(self, modules: list[str]) -> dict:
        """The floor (same modules removed) of a module set: measured once per results directory
        (floors.jsonl), since it depends on which modules are patched, not on how."""
        from ..eval import metrics as ev

        key = hashlib.sha256("\n".join(sorted(modules)).encode()).hexdigest()[:16]
        path = self.out / FLOORS
        for record in read_jsonl(path):
            if record.get("key") == key:
                return record["floor"]
        floor = ev.measure_floor(self.model, modules, self.tokenizer, self.prompts, self.teacher)
        append_jsonl(path, {"key": key, "num_modules": len(modules), "floor": floor})
        return floor

    def wall_s(self) -> float:
        """Seconds since this command started: model load, teacher and the points it measured."""
        return round(time.perf_counter() - self.start, 1)

    def effective(self, points: list[dict]) -> list[dict]:
        """Each point as the spec sees it: settings that cannot matter reset (StudentSpec.point), so
        they neither split points nor orphan results written before they existed. Keys that are no
        spec field (output options recorded by earlier versions) are dropped."""
        fields = set(POINT_FIELDS)
        return [canonical(dataclasses.replace(self.base, **{k: v for k, v in p.items() if k in fields}).point(),
                          self.num_layers) for p in points]

    def rekey(self, point: dict) -> str:
        """A stored point's key under today's fields: a field it lacks did not exist when it was
        written, so it had the value KEY_DEFAULTS records, not today's base."""
        return point_key(self.effective([{**{k: KEY_DEFAULTS[k] for k in POINT_FIELDS if k not in point}, **point}])[0])

    def run(self, points: list[dict], name: str) -> list[dict]:
        return run_points(self.effective(points), self.measure, self.results, desc=name, rekey=self.rekey)


def sweep(settings: EvalSettings, out, base: StudentSpec, axes: dict[str, list], io: StudentIO = StudentIO()):
    """Measure every point of the grid `axes` (grid_axes) over `base`; returns the records."""
    if not axes:
        raise InputError("the sweep has no axes: give at least one grid axis (KEY VALUE [VALUE ...]) or a "
                         "grid file", "grid")
    session = Session(settings, out, base, io)
    points = session.effective(expand_grid(session.base_point(), axes))
    planned = list(dict.fromkeys(point_key(p) for p in points))
    # The plan is on disk before the first point, so a report of an unfinished sweep shows what is done.
    write_json(session.out / "sweep.json", {"keys": planned, "axes": axes, "command": command_line()})
    records = session.run(points, "sweep")
    write_json(session.out / "sweep.json", {"keys": [r["key"] for r in records], "axes": axes,
                                            "command": command_line(), "wall_s": session.wall_s()})
    print_records(records, sorted(axes))
    print(f"results: {session.results}; report: bcllm report {session.out}")
    return records


def scan(settings: EvalSettings, out, base: StudentSpec, per: str = "layer", budgets=(),
         io: StudentIO = StudentIO()) -> list[dict]:
    """One point per layer of base.layers (per="module": per layer and module suffix), then a
    budgeted selection for each (kind, target) in `budgets` (parse_budget)."""
    if budgets and per != "layer":
        raise InputError("a budget selects whole layers: use it with per='layer'", "budget")
    session = Session(settings, out, base, io)
    point = session.base_point()
    suffixes = None
    if per == "module":
        from ..surgery import select_modules

        suffixes = sorted({n.rsplit(".", 1)[-1] for n in select_modules(session.model, base.targets, None)})
    layers = parse_layers(base.layers, session.num_layers) or list(range(session.num_layers))  # which to scan
    records = session.run(scan_points(point, layers, suffixes), "scan")
    write_json(session.out / "scan.json", {"keys": [r["key"] for r in records], "per": per,
                                           "command": command_line(), "wall_s": session.wall_s()})
    print_records(records, ["layers"] + (["targets"] if suffixes else []))
    table = [{"layer": int(r["point"]["layers"]), "kl_mean": r["metrics"]["kl_mean"],
              "token_agreement": r["metrics"]["token_agreement"],
              "saved_params": r["compression"]["model_params_before"] - r["compression"]["model_params_after"]}
             for r in records]
    for kind, target in budgets:
        budget_select(session, point, table, kind, target)
    return records


def budget_select(session: Session, base: dict, table: list[dict], kind: str, target: float) -> dict:
    """Choose layers for a budget from the scan table, measure the choice and the naive windows."""
    chosen = select_budget(table, kind, target, session.model_params)
    spec = layers_spec([r["layer"] for r in chosen], session.num_layers)
    windows = contiguous_windows(len(chosen), session.num_layers)
    points = [{**base, "layers": spec}] + [{**base, "layers": w} for w in windows.values()]
    by_layers = {r["point"]["layers"]: r for r in session.run(points, f"budget {kind}={target}")}
    measured, naive = by_layers[spec], [by_layers[w] for w in windows.values()]
    summary = lambda r: {"layers": r["point"]["layers"], "param_reduction": r["param_reduction"],
                         "token_agreement": r["metrics"]["token_agreement"], "kl_mean": r["metrics"]["kl_mean"]}
    record = {"budget": f"{kind}={target}", "base": point_key(base), "layers": spec,
              "num_layers": len(chosen), "predicted": predict(chosen), "measured": summary(measured),
              "naive": {name: summary(r) for name, r in zip(windows, naive)}, "command": command_line()}
    append_jsonl(session.out / BUDGETS, record)
    p, m = record["predicted"], record["measured"]
    print(f"budget {kind}={target}: {len(chosen)} layers {spec}; predicted token_agreement "
          f"{p['token_agreement']:.3f} kl_mean {p['kl_mean']:.3f}; measured {m['token_agreement']:.3f} / "
          f"{m['kl_mean']:.3f}; parameter reduction {m['param_reduction']:.3f}")
    for name, n in record["naive"].items():
        print(f"  naive {name:6s} {n['layers']:>8s}: token_agreement {n['token_agreement']:.3f} kl_mean {n['kl_mean']:.3f}")
    return record


def print_records(records: list[dict], keys: list[str]) -> None:
    print(" ".join(f"{k:>10s}" for k in keys) + f" {'reduction':>10s} {'agreement':>10s} {'kl_mean':>10s} {'time s':>8s}")
    for r in records:
        print(" ".join(f"{str(r['point'].get(k)):>10s}" for k in keys)
              + f" {r['param_reduction']:10.3f} {r['metrics']['token_agreement']:10.3f}"
                f" {r['metrics']['kl_mean']:10.4f} {r['time_s']:8.1f}")


# ---------------------------------------------------------------- frontier: mixed block sizes at a fidelity floor

FRONTIER = "frontier.json"


def greedy_path(table: dict[tuple[int, int], dict]) -> list[dict[int, int]]:
    """The order in which to compress, from a sensitivity table {(layer, block size): {"damage",
    "saved"}} (one layer patched alone): start dense; at each step take the move, compressing a
    new layer or moving a compressed one to a size saving more, with the least added damage per
    added parameter saved. Returns the states {layer: block size} after each move (a multiple-choice
    knapsack solved greedily; damages are taken to add up, which the path's measurements check)."""
    state: dict[int, int] = {}
    path = []
    while True:
        best = None
        for (layer, b), row in table.items():
            now = table.get((layer, state[layer])) if layer in state else {"damage": 0.0, "saved": 0}
            gain = row["saved"] - now["saved"]
            if gain <= 0:
                continue
            rate = max(row["damage"] - now["damage"], 0.0) / gain
            if best is None or (rate, layer, b) < best[0]:
                best = ((rate, layer, b), layer, b)
        if best is None:
            return path
        state = {**state, best[1]: best[2]}
        path.append(dict(sorted(state.items())))


def state_point(base: dict, state: dict[int, int], block_size: int, num_layers: int) -> dict:
    """The point (spec settings) of a mixed state {layer: block size}; block_sizes names each MLP."""
    sizes = ",".join(f"*.layers.{layer}.mlp.*={b}" for layer, b in sorted(state.items()) if b != block_size)
    return {**base, "layers": layers_spec(sorted(state), num_layers), "block_size": block_size, "block_sizes": sizes}


def _summary(record: dict) -> dict:
    return {"param_reduction": record["param_reduction"], "token_agreement": record["metrics"]["token_agreement"],
            "kl_mean": record["metrics"]["kl_mean"], "floor_token_agreement": record["metrics"].get("floor_token_agreement"),
            "key": record["key"]}


def in_time(deadline: float) -> bool:
    """Whether time.perf_counter() is still before `deadline`; under torchrun rank 0's clock decides
    for every rank (each rank's own could differ, and the ranks would measure different points)."""
    return dist.broadcast_object(time.perf_counter() < deadline)


def longest_prefix(path: list, measure, floor: float, deadline: float, measured=lambda state: False) -> int:
    """Index+1 of the longest prefix of `path` whose measured token agreement is >= floor; 0 if
    none. Galloping (prefixes 1, 2, 4, ... until one fails), then bisection, agreement taken to
    fall along the path: O(log k) measurements, the short prefixes (cheap to fit) first. Stops at
    `deadline` with the longest prefix known to hold; a state already measured (`measured`: its
    record is on disk, so it costs nothing) is still used after the deadline."""
    lo, hi = 0, len(path)  # prefix lo is known to hold (0: dense); hi is the largest still possible
    step = 1
    while lo < hi:  # gallop
        k = min(lo + step, hi)
        if not (measured(path[k - 1]) or in_time(deadline)):
            return lo
        if measure(path[k - 1])["token_agreement"] < floor:
            hi = k - 1
            break
        lo, step = k, 2 * step
    while lo < hi:  # bisect
        mid = (lo + hi + 1) // 2
        if not (measured(path[mid - 1]) or in_time(deadline)):
            break
        if measure(path[mid - 1])["token_agreement"] >= floor:
            lo = mid
        else:
            hi = mid - 1
    return lo


def frontier_scan(session: Session, point: dict, layers: list[int], sizes: list[int], scan_fit: str) -> dict:
    """{(layer, block size): {"damage": kl_mean, "saved": parameters}}, each layer patched alone."""
    from ..fit.closed_form import shared_input_stats

    points = [{**point, "layers": str(i), "block_size": b, "block_sizes": "", "fit": scan_fit}
              for i in layers for b in sizes]
    session.with_floor = False  # only an ordering: the floors are measured on the path, not per layer
    with shared_input_stats():  # an aware scan runs its calibration pass once
        scanned = session.run(points, "frontier scan")
    session.with_floor = True
    return {(int(r["point"]["layers"]), r["point"]["block_size"]): {
        "damage": r["metrics"]["kl_mean"],
        "saved": r["compression"]["model_params_before"] - r["compression"]["model_params_after"]} for r in scanned}


def save_chosen(session: Session, base: StudentSpec, point: dict, row: dict) -> None:
    """The chosen configuration's student, saved (row gets config, student): the one saved when the
    path measured it (save_students), else built once more beside the results."""
    row["config"] = state_point(point, row["state"], base.block_size, session.num_layers)
    kept = session.student_dir(session.effective([row["config"]])[0])
    if (kept / "fitted.json").is_file():
        row["student"] = str(kept)
        return
    row["student"] = str(session.out / f"student-{row['min_agreement']:g}")
    build_student(session.model, session.tokenizer, dataclasses.replace(base, **row["config"]),
                  StudentIO(save=row["student"]), eval_prompts=session.prompts, model_id=session.settings.model,
                  progress=False)


DECODE_BENCH = ("compiled", "eager", "none")


def check_decode_bench(mode: str) -> None:
    if mode not in DECODE_BENCH:
        raise InputError(f"decode_bench must be one of {', '.join(DECODE_BENCH)}, got {mode!r}", "decode_bench")


def chosen_decode_speed(session: Session, row: dict, mode: str) -> None:
    """Greedy-decode speed of the chosen student against the dense model, measured now with `bench
    model`'s lean loop (MLPs fused, `mode` compiled or eager, its default prompts and settings): row
    gets decode_speedup and the bench's figures. Rank 0 measures alone (ranks sharing a machine
    would time each other); every rank gets its figures."""
    from ..bench.measure import BENCH_PROMPTS, bench_model
    from ..io.prompts import load_prompts, tokenize_prompts
    from ..structures.circulant import fuse_circulant_mlp_

    @dist.on_main
    def measure():
        student, _ = build_student(session.model, session.tokenizer, StudentSpec(), StudentIO(load=row["student"]))
        fuse_circulant_mlp_(student)
        ids = tokenize_prompts(session.tokenizer, load_prompts(None)[:BENCH_PROMPTS])
        r = bench_model(session.model, student, ids, compile=mode == "compiled")
        keys = ("decode_speedup", "decode_mode", "decode_byte_ratio", "dense_decode_tokens_per_s",
                "compressed_decode_tokens_per_s", "eager_decode_speedup", "prefill_speedup")
        return {k: r[k] for k in keys}

    row["speed"] = measure()
    row["decode_speedup"] = row["speed"]["decode_speedup"]


def check_frontier(base: StudentSpec, floors: list[float], compare: str | None) -> None:
    """The frontier's own arguments, checked before any model loads."""
    from ..structures.base import STRUCTURES

    for a in floors:
        if not 0 < a <= 1:
            raise InputError(f"min_agreement must be in (0, 1], got {a}", "min_agreement")
    budgeted = [s for s, c in STRUCTURES.items()  # the structures sized by a circulant's parameter budget
                if s != "circulant" and "budget_block_size" in {f.name for f in dataclasses.fields(c)}]
    if compare is not None and compare not in budgeted:
        raise InputError(f"compare must be none or a budgeted structure ({', '.join(budgeted)}), got {compare!r}",
                         "compare")
    if base.structure != "circulant" or base.block_sizes:
        raise InputError("frontier searches block-circulant block sizes: leave structure and block_sizes at their "
                         "defaults (compare sets the structure measured beside it)", "structure")


def frontier(settings: EvalSettings, out, base: StudentSpec, floors: list[float], sizes: list[int],
             compare: str | None = "lowrank", time_budget_s: float = float("inf"), io: StudentIO = StudentIO(),
             scan_fit: str = "aware", decode_bench: str = "compiled") -> dict:
    """The largest parameter reduction whose token agreement (on settings.prompts) stays >= each of
    `floors`: scan each layer alone at each of `sizes`, order the moves greedily (greedy_path),
    bisect the path with measurements, then measure `compare` (a budgeted structure) at the same
    per-module budgets, save the chosen students and time their decode against dense
    (`decode_bench`: compiled, eager or none). The scan (only an ordering) fits with `scan_fit`; the
    path's points with base.fit, each student kept. Resumable: every point is in results.jsonl."""
    check_frontier(base, floors, compare)
    check_decode_bench(decode_bench)
    session = Session(settings, out, base, io)
    deadline = session.start + time_budget_s
    point, n = session.base_point(), session.num_layers
    table = frontier_scan(session, point, parse_layers(base.layers, n) or list(range(n)), sizes, scan_fit)
    path = greedy_path(table)
    measured: dict[str, dict] = {}

    def measure(state, structure="circulant"):
        p = state_point({**point, "structure": structure}, state, base.block_size, n)
        session.save_students = structure == "circulant"
        record = session.run([p], f"frontier {structure}")[0]
        session.save_students = False
        row = measured[json.dumps([structure, sorted(state.items())])] = {**_summary(record), "structure": structure,
                                                                          "state": state}
        return row

    def on_disk(state) -> bool:  # measured by an earlier run of this results directory
        p = session.effective([state_point(point, state, base.block_size, n)])[0]
        return point_key(p) in dist.broadcast_object(finished(session.results, session.rekey))

    chosen = []
    for floor in floors:
        k = longest_prefix(path, measure, floor, deadline, on_disk)
        row = {"min_agreement": floor, "steps": k, "state": path[k - 1] if k else {}}
        if k:
            row.update(measure(path[k - 1]))
            if compare:
                row["compare"] = measure(path[k - 1], compare)
        chosen.append(row)
    if compare:  # the comparison at every circulant point measured: one curve each
        for r in sorted((r for r in measured.values() if r["structure"] == "circulant"),
                        key=lambda r: r["param_reduction"]):
            if in_time(deadline):
                measure(r["state"], compare)
    curve = sorted(measured.values(), key=lambda r: (r["structure"], r["param_reduction"]))
    for row in chosen:
        if row["steps"]:
            save_chosen(session, base, point, row)
            if decode_bench != "none":
                chosen_decode_speed(session, row, decode_bench)
    result = {"floors": floors, "sizes": sizes, "scan_fit": scan_fit, "fit": base.fit, "chosen": chosen, "curve": curve,
              "scan": [{"layer": l, "block_size": b, **v} for (l, b), v in sorted(table.items())],
              "path": [sorted(s.items()) for s in path], "model_params": session.model_params,
              "prompts": settings.prompts, "command": command_line(), "versions": versions(),
              "wall_s": session.wall_s(), "stopped_by_time_budget": not in_time(deadline), "decode_bench": decode_bench}
    write_json(session.out / FRONTIER, result)
    return result
