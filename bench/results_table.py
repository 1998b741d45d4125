"""Markdown tables and matplotlib plots of benchmark records: any set of them, read as schema 1
(bench/_record.py writes it; older files are converted when read, never rewritten).

    python bench/results_table.py                        # every record in bench/results/, tables to stdout
    python bench/results_table.py bench/results/prefix_cache-*.json --metric "*_s" --plot gather.png
    python bench/results_table.py .benchmarks/appo --kind tools --where confinement=root --out tools.md

One table per kind of benchmark (more when its rows measure disjoint things, e.g. prefix_cache's gather and
end-to-end rows): a line per measured row of every record selected, the case fields that differ between
those lines, then one column per measurement ("name [unit]"); what all lines share is said above the table.
``--plot`` draws one panel per measurement (a bar per line; log scale when the values span more than 100x).
Files that are not benchmark records (e.g. bench/study_report.py's analyses) are skipped with a note on
stderr.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

from _record import COMMITTED_DIR, load_record

MAX_PANELS = 12


def load(paths: list[str | Path]) -> tuple[list[dict], list[str]]:
    """(records as schema 1, notes on the files skipped) from json files and folders of them (*.json)."""
    records, skipped = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            try:
                records.append({**load_record(file), "file": file.name})
            except ValueError as err:
                skipped.append(str(err))
    return records, skipped


def select(records: list[dict], kinds=(), metrics=(), where: dict | None = None) -> list[dict]:
    """The records of ``kinds`` (all when empty), each keeping the results whose name matches one of the
    ``metrics`` globs (all when empty) and whose case has every ``where`` key at that value (compared as
    text); records left without results are dropped."""
    chosen = []
    for rec in records:
        if kinds and rec["kind"] not in kinds:
            continue
        results = [r for r in rec["results"]
                   if (not metrics or any(fnmatch.fnmatchcase(r["name"], m) for m in metrics))
                   and all(str(r["case"].get(k)) == v for k, v in (where or {}).items())]
        if results:
            chosen.append({**rec, "results": results})
    return chosen


def lines_of(records: list[dict]) -> list[dict]:
    """One line per measured row: {"record": its tag, "case": {...}, "values": {(name, unit): value}}. The
    results of one row are consecutive and share its case; a repeated name starts the next row."""
    lines = []
    for rec in records:
        tag = f"{(rec.get('date') or '?')[:19]} {(rec.get('commit') or '?')[:7]}"
        current = None
        for result in rec["results"]:
            key = (result["name"], result["unit"])
            if current is None or current["case"] != result["case"] or key in current["values"]:
                current = {"record": tag, "kind": rec["kind"], "case": result["case"], "values": {}}
                lines.append(current)
            current["values"][key] = result["value"]
    return lines


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _split_labels(lines: list[dict]) -> tuple[dict, list[str]]:
    """(the case fields every line shares, the names of those that differ), in first-seen order."""
    names = list(dict.fromkeys(k for line in lines for k in line["case"]))
    shared = {k: lines[0]["case"].get(k) for k in names
              if all(k in line["case"] and line["case"][k] == lines[0]["case"][k] for line in lines)}
    return shared, [k for k in names if k not in shared]


def tables_of(lines: list[dict]) -> list[list[dict]]:
    """``lines`` (of one kind) grouped into tables: a line joins the first table whose measurements contain
    its own or are contained in them, else starts a new one."""
    tables: list[tuple[set, list[dict]]] = []
    for line in lines:
        keys = set(line["values"])
        for columns, members in tables:
            if keys <= columns or columns <= keys:
                columns |= keys
                members.append(line)
                break
        else:
            tables.append((keys, [line]))
    return [members for _, members in tables]


def markdown(records: list[dict]) -> str:
    """The tables (module docstring) of ``records``, by kind in the order the kinds first appear."""
    out = []
    for kind in dict.fromkeys(rec["kind"] for rec in records):
        recs = [rec for rec in records if rec["kind"] == kind]
        devices = ", ".join(dict.fromkeys(str(rec["device"].get("name")) for rec in recs))
        out.append(f"### {kind}\n")
        out.append(f"{len(recs)} record(s) on {devices}: {', '.join(rec['file'] for rec in recs)}\n")
        for lines in tables_of(lines_of(recs)):
            out += _table(lines)
    return "\n".join(out)


def _table(lines: list[dict]) -> list[str]:
    shared, varying = _split_labels(lines)
    tags = list(dict.fromkeys(line["record"] for line in lines))
    columns = list(dict.fromkeys(key for line in lines for key in line["values"]))
    out = [f"Every line: {', '.join(f'{k}={_fmt(v)}' for k, v in shared.items())}\n"] if shared else []
    tagged = len(tags) > 1  # a record column only when the lines come from several records
    head = ["record"] * tagged + varying + [f"{n} [{u}]" for n, u in columns]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in lines:
        cells = [line["record"]] * tagged + [_fmt(line["case"].get(k)) for k in varying]
        cells += [_fmt(line["values"].get(key)) for key in columns]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def plot(records: list[dict], out_png: str | Path) -> tuple[Path, list[str]]:
    """One horizontal bar chart per measurement (kind, name, unit) of ``records``, at most MAX_PANELS, into
    ``out_png``; returns the path and the measurements left out (choose them with ``--metric``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[tuple[str, float]]] = {}
    for kind in dict.fromkeys(rec["kind"] for rec in records):
        lines = lines_of([rec for rec in records if rec["kind"] == kind])
        _, varying = _split_labels(lines)
        several = len({line["record"] for line in lines}) > 1
        for line in lines:
            case = [f"{k}={_fmt(line['case'].get(k))}" for k in varying]
            label = " ".join([line["record"]] * several + case)
            for (name, unit), value in line["values"].items():
                if value is not None:
                    panels.setdefault((kind, name, unit), []).append((label or kind, value))
    if not panels:
        raise ValueError("nothing to plot: no measured value among the selected results")
    keys = list(panels)[:MAX_PANELS]
    heights = [max(1.2, 0.3 * len(panels[key]) + 0.8) for key in keys]
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, key in zip(axes[:, 0], keys):
        kind, name, unit = key
        labels, values = zip(*panels[key])
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), [label[:60] for label in labels], fontsize=7)
        ax.invert_yaxis()
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(positive) > 100 * min(positive):
            ax.set_xscale("log")
        ax.set_title(f"{kind}: {name}", fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png, [f"{k}: {n} [{u}]" for k, n, u in list(panels)[MAX_PANELS:]]


def _where(items: list[str]) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--where takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=[str(COMMITTED_DIR)],
                        help="record files or folders of them (default: bench/results/)")
    parser.add_argument("--kind", action="append", default=[],
                        help="only this kind of benchmark (repeatable)")
    parser.add_argument("--metric", action="append", default=[],
                        help="only measurements whose name matches this glob, e.g. 'median_s' (repeatable)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only results whose case has KEY=VALUE, e.g. impl=cuda (repeatable)")
    parser.add_argument("--out", type=Path, help="write the markdown here instead of printing it")
    parser.add_argument("--plot", type=Path, help="also draw the selected measurements into this PNG")
    args = parser.parse_args(argv)
    where = _where(args.where)
    try:
        records, skipped = load(args.paths)
    except FileNotFoundError as err:
        parser.error(str(err))
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    chosen = select(records, args.kind, args.metric, where)
    if not chosen:
        parser.error("no result matches (check --kind, --metric and --where against the records read)")
    text = markdown(chosen)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written to {args.out}")
    else:
        print(text)
    if args.plot:
        path, left_out = plot(chosen, args.plot)
        print(f"plotted to {path}" + (f"; left out (choose with --metric): {', '.join(left_out)}"
                                      if left_out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
