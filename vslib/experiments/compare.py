"""Comparing experiment runs: their table, the precision@k figure and the sortable page ``reports/runs/index.html``.

The page's style sheet and sorting script are package data (``vslib/static/compare.css``, ``compare.js``).
"""
from __future__ import annotations

import html
import json
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from vslib.experiments.plan import NOTEBOOK_PREFIX, fmt_value
from vslib.experiments.records import RECORD, RUN_CONFIG, load_runs
from vslib.redact import redact_config, redact_text

COMPARISON_PAGE = "index.html"
COMPARISON_FIGURE = "precision_at_k_by_mode.png"


def static_text(name: str) -> str:
    """The text of ``vslib/static/<name>`` (package data: there in an installed package too)."""
    return resources.files("vslib").joinpath("static", name).read_text(encoding="utf-8")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "index_options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _values(record: dict) -> dict:
    """``{section.key: value}`` of a run's settings (paths excluded) and ``{notebook.NAME: value}``."""
    out = _flatten({k: v for k, v in (record.get("config") or {}).items() if k != "paths"})
    out.update({NOTEBOOK_PREFIX + k: v for k, v in (record.get("notebook_parameters") or {}).items()})
    return out


def differing_parameters(records: Sequence[dict]) -> list[str]:
    """Setting names (``section.key``, ``notebook.NAME``) whose values differ between the runs (paths excluded)."""
    flat = [_values(r) for r in records]
    keys = sorted(set().union(*flat)) if flat else []
    given = [k for r in records for k in r.get("parameters", {})]
    order = list(dict.fromkeys(given)) + [k for k in keys if k not in given]
    return [k for k in order if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def metric_columns(records: Sequence[dict]) -> list[str]:
    """Metric column names: classifier and 1-NN accuracy, p@(smallest, largest k) per mode, hierarchy gain."""
    ks, modes = set(), []
    for r in records:
        for m, s in ((r.get("metrics") or {}).get("modes") or {}).items():
            modes.append(m)
            ks |= {int(c[2:]) for c in s if c.startswith("p@")}
    modes = list(dict.fromkeys(modes))
    pick = sorted({min(ks), max(ks)}) if ks else []
    cols = ["classifier_accuracy", "nn1_accuracy"]
    cols += [f"{m} p@{k}" for m in modes if m != "oracle" for k in pick]  # oracle: a diagnostic, in the figure only
    cols += [f"gain p@{k}" for k in pick]
    return cols


def metric_value(record: dict, column: str) -> Optional[float]:
    m = record.get("metrics") or {}
    if column.startswith("gain "):
        return ((m.get("gain") or {}).get("adaptive_vs_flat") or {}).get(column[5:])
    if " " in column:
        mode, k = column.split(" ", 1)
        return ((m.get("modes") or {}).get(mode) or {}).get(k)
    return m.get(column)


def runs_table(records: Sequence[dict]):
    """A DataFrame: one row per run with its status, differing parameters, metrics and seconds."""
    import pandas as pd

    params = differing_parameters(records)
    metrics = metric_columns(records)
    rows = []
    for r in records:
        flat = _values(r)
        row = {"run": r.get("id"), "status": r.get("status")}
        row.update({p: flat.get(p) for p in params})
        row.update({c: metric_value(r, c) for c in metrics})
        row["seconds"] = r.get("seconds")
        row["error"] = r.get("error")
        rows.append(row)
    return pd.DataFrame(rows, columns=["run", "status", *params, *metrics, "seconds", "error"])


def plot_precision(records: Sequence[dict], save_as: Optional[Path] = None):
    """One panel per mode, p@k against k, one line per successful run; returns the figure."""
    import matplotlib

    if save_as is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and (r.get("metrics") or {}).get("modes")]
    modes = list(dict.fromkeys(m for r in ok for m in r["metrics"]["modes"]))
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(3.6 * max(1, len(modes)), 3.4), sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for i, r in enumerate(ok):
            s = r["metrics"]["modes"].get(mode, {})
            ks = sorted(int(c[2:]) for c in s if c.startswith("p@"))
            ax.plot(ks, [s[f"p@{k}"] for k in ks], marker="o", color=plt.cm.tab10(i % 10), label=r["id"])
        ax.set_title(mode)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision@k")
    if ok:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=min(2, len(ok)), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0))
        fig.tight_layout(rect=(0, 0.08 + 0.045 * ((len(ok) + 1) // 2), 1, 1))
    if save_as is not None:
        Path(save_as).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_as, dpi=110)
        plt.close(fig)
    return fig


def _cell(value: Any) -> str:
    if value is None:
        return '<td data-v="" class="na">–</td>'
    if isinstance(value, float):
        return f'<td data-v="{value!r}" class="num">{value:.3f}</td>'
    if isinstance(value, bool):
        return f"<td>{fmt_value(value)}</td>"
    if isinstance(value, int):
        return f'<td data-v="{value}" class="num">{value}</td>'
    return f"<td>{html.escape(fmt_value(value))}</td>"


def write_comparison(root: str | os.PathLike) -> Path:
    """Write ``root/index.html``: one sortable table of every run, p@k per mode, links to each run's reports."""
    root = Path(root)
    # records written before secrets were redacted must not publish theirs here
    records = [dict(r, config=redact_config(r.get("config")), error=redact_text(r["error"]) if r.get("error") else None)
               for r in load_runs(root)]
    table = runs_table(records)
    params = differing_parameters(records)
    metrics = metric_columns(records)
    fig_path = root / COMPARISON_FIGURE
    if any(r.get("status") == "ok" for r in records):
        plot_precision(records, save_as=fig_path)
    n_ok = sum(r.get("status") == "ok" for r in records)
    counts: dict = {}
    for r in records:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    head = ["run", "status", *params, *metrics, "seconds"]
    # the best value of a metric, where the runs differ in it
    best = {c: table[c].max() for c in metrics if c in table and table[c].notna().any() and table[c].nunique() > 1}
    rows = []
    for r, (_, row) in zip(records, table.iterrows()):
        rid = r["id"]
        colour = {"ok": "#1a9850", "failed": "#d73027"}.get(r.get("status"), "#777")
        links = []
        for name, label in (("index.html", "notebooks"), ("evaluation.md", "evaluation"), (RECORD, "record"),
                            (RUN_CONFIG, "config"), ("error.txt", "traceback")):
            if (root / rid / name).exists():
                links.append(f'<a href="{html.escape(rid)}/{name}">{label}</a>')
        cells = [f'<td><a href="{html.escape(rid)}/">{html.escape(rid)}</a><br><small>{" · ".join(links)}</small></td>',
                 f'<td style="color:{colour}"><b>{html.escape(str(r.get("status")))}</b>'
                 + (f'<br><small>{html.escape(str(r.get("error"))[:300])}</small>' if r.get("error") else "")
                 + "</td>"]
        cells += [_cell(_plain(row[p])) for p in params]
        for c in metrics:
            v = _plain(row[c])
            cell = _cell(v)
            if v is not None and c in best and v == best[c]:
                cell = cell.replace("<td ", '<td style="font-weight:bold" ', 1)
            cells.append(cell)
        cells.append(_cell(_plain(row["seconds"])))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    common = {}
    if records:
        flat = _values(records[-1])
        common = {k: v for k, v in flat.items() if k not in params}
    thumbs = []
    for r in records:
        fig = root / r["id"] / "figures" / "precision_at_k.png"
        if fig.exists():
            thumbs.append(f'<figure><a href="{html.escape(r["id"])}/figures/precision_at_k.png"><img src="'
                          f'{html.escape(r["id"])}/figures/precision_at_k.png" width="300"></a>'
                          f'<figcaption>{html.escape(r["id"])}</figcaption></figure>')
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>VisualSearch runs</title><style>",
        static_text("compare.css").rstrip("\n"),
        "</style></head><body>",
        "<h1>VisualSearch experiment runs</h1>",
        f"<p>{len(records)} runs ({', '.join(f'{v} {k}' for k, v in counts.items()) or 'none yet'}) in <code>{html.escape(str(root))}</code>; "
        f"page written {time.strftime('%Y-%m-%d %H:%M:%S')}. Click a column header to sort. "
        "Metrics are on the held-out query split: <i>classifier_accuracy</i> is the classifier's top-1, "
        "<i>nn1_accuracy</i> the label of the single nearest indexed image, <i>MODE p@k</i> precision at k, "
        "<i>gain p@k</i> adaptive minus flat (the hierarchy gain); <i>oracle</i> (filtered to the true class) is "
        "a diagnostic, drawn below but not tabled. Where runs differ in a metric, the best value is bold.</p>",
        '<table class="runs"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>", *rows, "</tbody></table>",
    ]
    if common:
        parts.append("<details><summary>Settings shared by all runs (from the latest run)</summary><table>"
                     + "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(fmt_value(v))}</td></tr>"
                               for k, v in common.items()) + "</table></details>")
    if fig_path.exists() and n_ok:
        parts += ["<h2>Precision@k per mode</h2>", f'<p><img src="{COMPARISON_FIGURE}" style="max-width:100%"></p>']
    if thumbs:
        parts += ["<h2>Each run's precision@k</h2>", "<div>", *thumbs, "</div>"]
    parts += [f"<script>\n{static_text('compare.js')}</script>", "</body></html>"]
    out = root / COMPARISON_PAGE
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _plain(v: Any) -> Any:
    """A pandas cell as a plain Python value (NaN -> None)."""
    try:
        import pandas as pd

        if v is None or (not isinstance(v, (list, dict, str)) and pd.isna(v)):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(v, "item"):
        return v.item()
    return v


__all__ = ["COMPARISON_FIGURE", "COMPARISON_PAGE", "differing_parameters", "metric_columns", "metric_value",
           "plot_precision", "runs_table", "static_text", "write_comparison"]
