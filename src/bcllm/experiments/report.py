"""`bcllm report`: a markdown report with PNG plots from a results directory (experiments.py)
and optional `bcllm bench` JSON files. Reads result files only; never runs a model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import InputError
from .runs import BUDGETS, MANIFEST, RESULTS, pareto_front
from ..io.results import atomic_write, read_jsonl, with_current_keys

FIT_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
FRONT_STYLE = dict(color="black", lw=1.2, ls="--", zorder=1)


def load_run(run_dir) -> dict:
    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{str(run_dir)!r} has no {MANIFEST}: give a directory written by bcllm scan or sweep")
    records = {r["key"]: with_current_keys(r) for r in read_jsonl(run_dir / RESULTS) if "key" in r}
    lists = {}
    for name in ("sweep", "scan"):
        f = run_dir / f"{name}.json"
        lists[name] = json.loads(f.read_text()) if f.is_file() else None
    return {"dir": run_dir, "manifest": json.loads(manifest.read_text()), "records": records,
            "sweep": lists["sweep"], "scan": lists["scan"], "budgets": latest_budgets(read_jsonl(run_dir / BUDGETS))}


def latest_budgets(budgets: list[dict]) -> list[dict]:
    """The last record of each budget (a rerun of the same scan and budget appends it again)."""
    return list({(b["budget"], b.get("base")): b for b in budgets}.values())


def picked(run: dict, name: str) -> list[dict]:
    """Records of the last sweep or scan, in its order (points not yet measured are skipped)."""
    if not run[name]:
        return []
    return [run["records"][k] for k in run[name]["keys"] if k in run["records"]]


# ---------------------------------------------------------------- labels

def series(record: dict, varying: list[str]) -> str:
    """Label of a record's settings other than block size and layers (fit, structure, ...)."""
    parts = [f"{k}={record['point'][k]}" for k in varying if k in record["point"]]
    return ", ".join(parts) or "circulant"


def varying_keys(records: list[dict], skip=("block_size", "layers")) -> list[str]:
    keys = sorted({k for r in records for k in r["point"]})
    return [k for k in keys if k not in skip and len({json.dumps(r["point"].get(k)) for r in records}) > 1]


def colors(values):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    values = sorted(set(values), key=lambda v: (v is None, v))
    return {v: cmap(i / max(len(values) - 1, 1) * 0.9) for i, v in enumerate(values)}


# ---------------------------------------------------------------- plots

def plot_fidelity_vs_params(records: list[dict], path) -> None:
    """Token agreement and KL against parameter reduction; Pareto front; dense model marked."""
    import matplotlib.pyplot as plt

    varying = varying_keys(records)
    labels = sorted({series(r, varying) for r in records})
    marker = {s: FIT_MARKERS[i % len(FIT_MARKERS)] for i, s in enumerate(labels)}
    color = colors(r["point"].get("block_size") for r in records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, maximize, ylabel in [
            (axes[0], "token_agreement", True, "token agreement with the dense model (fraction)"),
            (axes[1], "kl_mean", False, "KL(dense ‖ compressed), nats per token (log scale)")]:
        rows = [{"x": 100 * r["param_reduction"], "y": r["metrics"][metric], "r": r} for r in records]
        for row in rows:
            r = row["r"]
            ax.scatter(row["x"], row["y"], color=color[r["point"].get("block_size")],
                       marker=marker[series(r, varying)], s=55, edgecolor="black", linewidth=0.5, zorder=3)
        front = pareto_front(rows, "x", "y", maximize_y=maximize)
        ax.plot([f["x"] for f in front], [f["y"] for f in front], **FRONT_STYLE, label="Pareto front")
        if maximize:
            ax.axhline(1.0, color="gray", lw=1, ls=":")
            ax.scatter([0], [1.0], marker="*", s=220, color="gold", edgecolor="black", zorder=4,
                       label="dense model")
            ax.set_ylim(-0.02, 1.05)
        else:
            ax.set_yscale("log")
            ax.text(0.02, 0.97, "dense model: KL = 0 (below the axis)", transform=ax.transAxes, va="top",
                    fontsize=9, color="dimgray")
        ax.set_xlabel("parameter reduction (% of the model's parameters)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    # one legend for both panels: block size by colour, other settings by marker
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, markeredgecolor="black", label=f"block size {b}")
               for b, c in color.items()]
    handles += [plt.Line2D([], [], ls="", marker=marker[s], color="lightgray", markeredgecolor="black", label=s)
                for s in labels if len(labels) > 1]
    handles += [plt.Line2D([], [], **FRONT_STYLE, label="Pareto front"),
                plt.Line2D([], [], ls="", marker="*", markersize=14, color="gold", markeredgecolor="black",
                           label="dense model")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle("Fidelity against parameter reduction (every sweep point)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_num_layers(records: list[dict], path) -> None:
    """KL and token agreement against the number of patched layers, one line per block size."""
    import matplotlib.pyplot as plt

    varying = varying_keys(records)
    labels = sorted({series(r, varying) for r in records})
    styles = {s: ["-", "--", ":", "-."][i % 4] for i, s in enumerate(labels)}
    color = colors(r["point"].get("block_size") for r in records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    groups = {}
    for r in records:
        groups.setdefault((r["point"].get("block_size"), series(r, varying)), []).append(r)
    for (b, s), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        rs = sorted(rs, key=lambda r: r["num_layers"])
        label = f"b={b}" + (f", {s}" if len(labels) > 1 else "")
        for ax, metric in [(axes[0], "token_agreement"), (axes[1], "kl_mean")]:
            ax.plot([r["num_layers"] for r in rs], [r["metrics"][metric] for r in rs], marker="o",
                    color=color[b], ls=styles[s], label=label)
    axes[0].axhline(1.0, color="gray", lw=1, ls=":", label="dense model")
    axes[0].set_ylabel("token agreement with the dense model (fraction)")
    axes[0].set_ylim(-0.02, 1.05)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("KL(dense ‖ compressed), nats per token (log scale)")
    for ax in axes:
        ax.set_xscale("log")
        ticks = sorted({r["num_layers"] for r in records})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("number of patched decoder layers (log scale)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, ncol=2 if len(groups) > 6 else 1)
    fig.suptitle("Fidelity against the number of patched layers, per block size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(records: list[dict], path) -> None:
    """Per-layer kl_mean and token agreement when that layer alone is patched."""
    import matplotlib.pyplot as plt

    varying = varying_keys(records, skip=("layers",))
    labels = sorted({series(r, varying) for r in records})
    color = {s: c for s, c in zip(labels, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"] * 9)}
    layers = sorted({int(r["point"]["layers"]) for r in records})
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True)
    for i, s in enumerate(labels):
        rs = {int(r["point"]["layers"]): r for r in records if series(r, varying) == s}
        xs = [l + (i - (len(labels) - 1) / 2) * width for l in layers if l in rs]
        for ax, metric in [(axes[0], "kl_mean"), (axes[1], "token_agreement")]:
            ax.bar(xs, [rs[l]["metrics"][metric] for l in layers if l in rs], width=width, color=color[s],
                   label=s if len(labels) > 1 else None)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL, nats per token\n(log scale; lower is better)")
    axes[1].set_ylabel("token agreement\n(higher is better)")
    axes[1].axhline(1.0, color="gray", lw=1, ls=":", label="dense model")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("decoder layer patched alone")
    axes[1].set_xticks(layers)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(names),
               frameon=False)
    fig.suptitle("Per-layer sensitivity: one decoder layer patched at a time")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_rows(data) -> list[dict]:
    """Rows with a block size and a speedup, wherever they sit in a bench JSON."""
    if isinstance(data, list):
        return [row for item in data for row in bench_rows(item)]
    if not isinstance(data, dict):
        return []
    if "block_size" in data and "speedup" in data:
        return [data]
    return [row for value in data.values() for row in bench_rows(value)]


def bench_label(row: dict) -> str:
    shape = row.get("shape") or (f"{row['out_features']}x{row['in_features']}" if "out_features" in row else "")
    tokens = row.get("tokens", row.get("batch"))
    return " ".join(p for p in [str(shape) if shape else "", f"{tokens} tok" if tokens is not None else ""] if p) or "layer"


def plot_speedup(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    groups = {}
    for row in rows:
        groups.setdefault(bench_label(row), []).append(row)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["block_size"])
        ax.plot([r["block_size"] for r in rs], [r["speedup"] for r in rs], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=1, ls=":", label="dense layer (1x)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r["block_size"] for r in rows})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("block size b (log scale)")
    ax.set_ylabel("speedup over the dense layer (x, log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Measured layer speedup against block size (bcllm bench)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- markdown

def fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


METRICS = [("token_agreement", "token agr."), ("kl_mean", "KL mean"), ("top5_overlap", "top-5 overlap"),
           ("generation_agreement", "gen. agr."), ("floor_token_agreement", "floor agr."),
           ("floor_kl_mean", "floor KL"), ("kl_recovered", "KL recovered")]


def sweep_section(records: list[dict], run: dict, img: str, tag: str = "") -> str:
    varying = varying_keys(records, skip=())
    keys = [k for k in ["block_size", "layers"] if k in varying] + [k for k in varying if k not in ("block_size", "layers")]
    fixed = {k: v for k, v in records[0]["point"].items() if k not in varying and v not in (None, False)}
    metrics = [(m, h) for m, h in METRICS if any(r["metrics"].get(m) is not None for r in records)]
    rows = [[r["point"].get(k) for k in keys] + [f"{100 * r['param_reduction']:.1f}"] +
            [r["metrics"].get(m) for m, _ in metrics] + [f"{r['time_s']:.0f}"] for r in records]
    total = sum(r["time_s"] for r in records)
    wall = run["sweep"].get("wall_s")
    planned = len(run["sweep"]["keys"])
    text = [f"## Sweep: {len(records)} points" + (f" measured of {planned} planned (unfinished)" if planned > len(records) else ""),
            f"Fixed settings: {', '.join(f'`{k}={v}`' for k, v in fixed.items()) or 'none'}. "
            f"Sum of point times: {total / 60:.1f} min (model load and teacher outputs not included)"
            + (f"; the last `bcllm sweep` run took {wall / 60:.1f} min in all" if wall else "") + ". "
            f"Command: `{run['sweep'].get('command', '')}`", "",
            md_table(keys + ["param. reduction %"] + [h for _, h in metrics] + ["time s"], rows), "",
            f"![fidelity against parameter reduction]({img}/{tag}fidelity_vs_params.png)", "",
            f"![fidelity against number of layers]({img}/{tag}fidelity_vs_layers.png)", ""]
    return "\n".join(text)


def scan_section(records: list[dict], run: dict, img: str, tag: str = "") -> str:
    varying = varying_keys(records, skip=("layers",))
    labels = sorted({series(r, varying) for r in records})
    layers = sorted({int(r["point"]["layers"]) for r in records})
    by = {(int(r["point"]["layers"]), series(r, varying)): r for r in records}
    header = ["layer"] + [f"{m} ({s})" if len(labels) > 1 else m for s in labels for m in ("KL mean", "token agr.")]
    rows = [[l] + [x for s in labels for x in ((by[(l, s)]["metrics"]["kl_mean"], by[(l, s)]["metrics"]["token_agreement"])
                                               if (l, s) in by else (None, None))] for l in layers]
    fixed = {k: v for k, v in records[0]["point"].items() if k != "layers" and k not in varying and v not in (None, False)}
    return "\n".join([f"## Per-layer sensitivity scan",
                      f"Each decoder layer patched alone; fixed settings: "
                      f"{', '.join(f'`{k}={v}`' for k, v in fixed.items())}. Command: `{run['scan'].get('command', '')}`",
                      "", md_table(header, rows), "", f"![per-layer sensitivity]({img}/{tag}sensitivity.png)", ""])


def budget_section(budgets: list[dict]) -> str:
    rows = []
    for b in budgets:
        rows.append([f"`{b['budget']}`", b["layers"], b["num_layers"], f"{100 * b['measured']['param_reduction']:.1f}",
                     b["predicted"]["token_agreement"], b["measured"]["token_agreement"],
                     b["predicted"]["kl_mean"], b["measured"]["kl_mean"]])
        for name, n in b["naive"].items():
            rows.append([f"naive {name} {b['num_layers']}", n["layers"], b["num_layers"],
                         f"{100 * n['param_reduction']:.1f}", None, n["token_agreement"], None, n["kl_mean"]])
    return "\n".join(["## Budgeted selection",
                      "Layers chosen greedily from the scan (least damage per parameter saved), predicted by adding "
                      "the single-layer damages, then measured end to end; compared with naive contiguous windows "
                      "of the same number of layers (first, middle, last).", "",
                      md_table(["selection", "layers", "n", "param. reduction %", "agr. predicted", "agr. measured",
                                "KL predicted", "KL measured"], rows), ""])


def speed_section(rows: list[dict], files: list, img: str) -> str:
    table = [[bench_label(r), r["block_size"], f"{r['speedup']:.2f}"] + [r.get(k) for k in ("flop_ratio", "byte_ratio")]
             for r in sorted(rows, key=lambda r: (bench_label(r), r["block_size"]))]
    return "\n".join(["## Speed", f"From {', '.join(f'`{f}`' for f in files)}.", "",
                      md_table(["shape / tokens", "block size", "speedup x", "FLOP ratio", "byte ratio"], table), "",
                      f"![speedup against block size]({img}/speedup.png)", ""])


def read_bench_files(bench_files) -> list[dict]:
    """The rows of bench JSON files (bench_rows), with a clear error for a missing or foreign file."""
    rows = []
    for f in bench_files or ():
        try:
            found = bench_rows(json.loads(Path(f).read_text()))
        except FileNotFoundError:
            raise InputError(f"bench file {str(f)!r} does not exist", "bench") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"bench file {str(f)!r} is not JSON: {e}", "bench") from None
        if not found:
            raise InputError(f"bench file {str(f)!r} has no results with block_size and speedup", "bench")
        rows += found
    return rows


def render(run_dirs, out_md, bench_files=(), frontier_files=()) -> list[Path]:
    """Write the markdown report and its PNGs (in a folder named after it); return the files written.
    run_dirs: one results directory or several of the same model (e.g. sweep and scan), each its own
    sections; then the speed section (bench_files) and one per `bcllm frontier --json` file."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    models = sorted({str(r["manifest"]["identity"].get("model")) for r in runs})
    if len(models) > 1:
        raise InputError(f"the results directories are for different models ({', '.join(models)}); "
                         f"report one model at a time")
    out_md = Path(out_md)
    if not out_md.parent.is_dir():
        raise InputError(f"cannot write {str(out_md)!r}: directory {str(out_md.parent)!r} does not exist")
    img_dir = out_md.with_suffix("")
    img_dir.mkdir(exist_ok=True)
    img = img_dir.name
    written = []
    versions = runs[0]["manifest"].get("versions", {})
    parts = [f"# bcllm results: {models[0]}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bcllm report`. Fidelity is "
             f"measured teacher-forced against the dense model, every position of every prompt counted; KL in "
             f"nats per token; parameter reduction as a share of all model parameters.", "",
             f"Machine: {versions.get('cpu', '?')}, {versions.get('threads', '?')} threads, torch "
             f"{versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}.", ""]
    found_any = False
    for i, run in enumerate(runs):
        identity = run["manifest"]["identity"]
        tag = f"{i + 1}_" if len(runs) > 1 else ""
        parts += [f"**Results from `{run['dir']}`**: {identity.get('num_prompts', '?')} prompts "
                  f"(`{identity.get('prompts')}`), {identity.get('max_new_tokens')} generated tokens per prompt, "
                  f"{identity.get('model_params', 0):,} model parameters, dtype {identity.get('dtype')}.", ""]
        sweep = picked(run, "sweep")
        if sweep:
            plot_fidelity_vs_params(sweep, img_dir / f"{tag}fidelity_vs_params.png")
            plot_vs_num_layers(sweep, img_dir / f"{tag}fidelity_vs_layers.png")
            written += [img_dir / f"{tag}fidelity_vs_params.png", img_dir / f"{tag}fidelity_vs_layers.png"]
            parts.append(sweep_section(sweep, run, img, tag))
        scan = picked(run, "scan")
        if scan:
            plot_sensitivity(scan, img_dir / f"{tag}sensitivity.png")
            written.append(img_dir / f"{tag}sensitivity.png")
            parts.append(scan_section(scan, run, img, tag))
        if run["budgets"]:
            parts.append(budget_section(run["budgets"]))
        found_any = found_any or bool(sweep or scan or run["budgets"])
    rows, files = read_bench_files(bench_files), [str(f) for f in bench_files or ()]
    if rows:
        plot_speedup(rows, img_dir / "speedup.png")
        written.append(img_dir / "speedup.png")
        parts.append(speed_section(rows, files, img))
    texts, pngs = frontier_sections(frontier_files or (), img_dir, img)
    parts, written = parts + texts, written + pngs
    if not (found_any or rows or frontier_files):
        raise InputError("no finished scan or sweep points yet in " + ", ".join(str(r["dir"]) for r in runs))
    atomic_write(out_md, "\n".join(parts))
    return [out_md] + written


# ---------------------------------------------------------------- frontier (bcllm frontier)

def plot_frontier(result: dict, path) -> None:
    """Token agreement against parameter reduction along the measured frontier path, per structure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for structure, style in zip(sorted({r["structure"] for r in result["curve"]}), ("o-", "s--", "^:")):
        rows = sorted((r for r in result["curve"] if r["structure"] == structure), key=lambda r: r["param_reduction"])
        ax.plot([0] + [100 * r["param_reduction"] for r in rows], [1.0] + [r["token_agreement"] for r in rows],
                style, label=structure, markeredgecolor="black")
    removed = sorted((r for r in result["curve"] if r["structure"] == "circulant" and r.get("floor_token_agreement")
                      is not None), key=lambda r: r["param_reduction"])
    if removed:  # the floor: the same modules deleted (x: the circulant's reduction, for alignment)
        ax.plot([0] + [100 * r["param_reduction"] for r in removed], [1.0] + [r["floor_token_agreement"] for r in removed],
                "x:", color="gray", label="floor: same modules removed")
    for floor in result["floors"]:
        ax.axhline(floor, color="gray", lw=1, ls=":")
    ax.set_xlabel("parameter reduction (% of all the model's parameters)")
    ax.set_ylabel("token agreement with the dense model")
    ax.set_title("Frontier: greedy mixed block sizes; equal per-module budgets")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_markdown(result: dict, image: str) -> str:
    """The frontier section: chosen configurations, the measured curve, and the plot at `image`."""
    rows = []
    for c in result["chosen"]:
        cmp = c.get("compare", {})
        sizes = ", ".join(f"{layer}:{b}" for layer, b in sorted(c["state"].items(), key=lambda kv: int(kv[0])))
        rows.append([c["min_agreement"], f"{100 * c.get('param_reduction', 0):.2f}", c.get("token_agreement"),
                     c.get("kl_mean"), cmp.get("token_agreement"), cmp.get("kl_mean"),
                     f"{c['decode_speedup']:.2f}x" if c.get("decode_speedup") else "–", sizes or "(none)",
                     c.get("student")])
    curve = [[r["structure"], f"{100 * r['param_reduction']:.2f}", r["token_agreement"], r["kl_mean"],
              r.get("floor_token_agreement"), len(r["state"])] for r in result["curve"]]
    text = ["## Frontier", f"Prompts: `{result['prompts'] or 'bundled'}`; block sizes considered: {result['sizes']}; "
            f"{len(result['scan'])} single-layer points scanned; path fitted with `{result.get('fit', '?')}`; "
            f"{result['wall_s'] / 60:.1f} min. Decode speedup: the chosen student against dense, greedy decode "
            f"in `bench model`'s lean loop ({result.get('decode_bench', 'not measured')}), same run. "
            f"Command: `{result['command']}`", "",
            md_table(["min agreement", "param. reduction %", "circulant agr.", "circulant KL", "compared agr.",
                      "compared KL", "decode speedup", "layer:block size", "student"], rows), "",
            "Every configuration measured on the path (the comparison at the same per-module budgets):", "",
            md_table(["structure", "param. reduction %", "token agr.", "KL mean", "floor agr.", "layers"], curve), "",
            f"![frontier]({image})", ""]
    return "\n".join(text)


def frontier_sections(files, img_dir: Path, img: str) -> tuple[list[str], list[Path]]:
    """(markdown, plot) for each `bcllm frontier --json` file, the plots written into img_dir."""
    texts, pngs = [], []
    for i, path in enumerate(files):
        png = img_dir / f"frontier{i + 1 if len(files) > 1 else ''}.png"
        try:
            result = json.loads(Path(path).read_text())
            plot_frontier(result, png)
            texts.append(frontier_markdown(result, f"{img}/{png.name}"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read frontier results {str(path)!r} ({type(e).__name__}: {e}); give the "
                             f"file `bcllm frontier --json` wrote") from None
        pngs.append(png)
    return texts, pngs


def frontier_section(result: dict, out_dir) -> list[Path]:
    """frontier.md (chosen configurations and the measured curve) and frontier.png in out_dir."""
    out_dir = Path(out_dir)
    plot_frontier(result, out_dir / "frontier.png")
    path = out_dir / "frontier.md"
    atomic_write(path, frontier_markdown(result, "frontier.png"))
    return [path, out_dir / "frontier.png"]
