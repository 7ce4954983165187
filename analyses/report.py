"""``write_report``: every analysis of one or more runs as PNG figures plus one self-contained HTML file.

The HTML embeds the PNGs as base64 ``data:`` URIs and the summary tables inline, so the single file can be
mailed or attached to an issue. Figures are the matplotlib builders of ``cppo_diag.analyses.plots_mpl``.
"""

from __future__ import annotations

import base64
import html
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from cppo_diag.analyses import plots_mpl as P
from cppo_diag.analyses.binning import auto_bin_width, max_response_length
from cppo_diag.analyses.budget import budget_exhaustion
from cppo_diag.analyses.compare import compare_runs
from cppo_diag.analyses.mismatch import mismatch_by_position
from cppo_diag.analyses.aggregate import position_summary
from cppo_diag.analyses.tokens import MissingColumnError, columns_of, load_tokens, run_meta, run_name
from cppo_diag.analyses.updates import UPDATE_LABELS, resolve_updates, updates_note
from cppo_diag.analyses.whatif import whatif_sweep
from cppo_diag.storage.meta import RunMeta

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em} h3{margin-top:1.5em}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0;display:block;overflow-x:auto;max-width:100%} th,td{border:1px solid #ddd;padding:3px 7px;
     text-align:right} th{background:#f5f5f5} td.l,th.l{text-align:left} .note{color:#8a5a00;background:#fff8e6;
     padding:.4em .7em;border-left:3px solid #f0b400} code{background:#f4f4f4;padding:0 3px}
"""


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "run"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(df: pl.DataFrame, max_rows: int = 60) -> str:
    if df.is_empty():
        return "<p><em>(empty)</em></p>"
    head = "".join(f"<th class='l'>{html.escape(c)}</th>" if df[c].dtype == pl.Utf8 else f"<th>{html.escape(c)}</th>"
                   for c in df.columns)
    rows = []
    for r in df.head(max_rows).iter_rows():
        rows.append("<tr>" + "".join(f"<td class='l'>{_fmt(v)}</td>" if isinstance(v, str) else f"<td>{_fmt(v)}</td>"
                                     for v in r) + "</tr>")
    more = f"<p><em>{df.height - max_rows} more rows not shown</em></p>" if df.height > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


class _Doc:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.pngs: list[Path] = []

    def h(self, level: int, text: str):
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str, cls: str | None = None):
        c = f" class='{cls}'" if cls else ""
        self.parts.append(f"<p{c}>{text}</p>")

    def fig(self, fig, name: str, caption: str):
        path = P.save_png(fig, self.out_dir / f"{name}.png")
        self.pngs.append(path)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                          f"<figcaption>{caption}</figcaption></figure>")

    def table(self, df: pl.DataFrame, max_rows: int = 60):
        self.parts.append(_table(df, max_rows))


def _cppo_params(meta: RunMeta, params: dict) -> dict:
    if "cppo" in params:
        return dict(params["cppo"])
    if str(meta.rule or "").startswith("cppo"):  # the run's own CPPO-family parameters
        from cppo_diag.masks import get_rule

        known = get_rule("cppo").params
        return {k: v for k, v in meta.rule_params.items() if k in known}
    return {}


def write_report(
    sources: Sequence[Any],
    out_dir,
    *,
    rules: Sequence[str] = ("grpo_clip", "dppo", "cppo"),
    params: dict | None = None,
    bin_width: int | None = None,
    step_range=None,
    whatif: bool = True,
    progress: bool = True,
    title: str = "cppo-diag report",
    updates: str | None = None,
    profiles: Sequence[str] = (),
) -> Path:
    """Write PNGs and ``report.html`` for ``sources`` (runs or run directories) into ``out_dir``.

    ``rules``: rules recomputed on every run for the comparison; ``params``: rule name -> parameters
    (a rule given no parameters that a run applied gets that run's recorded ``rule_params``; the CPPO figures use ``params["cppo"]``, else the run's own parameters when it trained with cppo, else
    the defaults); ``bin_width``: position bin width in tokens, None for ``auto_bin_width`` over the longest
    response; ``updates``: which optimiser updates every analysis pools ("all", "first", "after_first"; None:
    each run's ``default_updates``, i.e. the updates after the first for runs with several per batch);
    ``profiles``: CPPO profiles recomputed beside ``rules`` (``cppo[<profile>]`` rows). Returns the path of
    the HTML file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from cppo_diag.masks import rule_defaults

    params = dict(params or {})
    cppo_defaults = rule_defaults("cppo")  # the Fig. 2 overlay's delta and w_min unless set
    for src in sources:  # a compared rule that a run applied, without --param: the parameters it recorded
        meta = run_meta(src)
        if meta.rule in rules and meta.rule not in params and meta.rule_params:
            params[meta.rule] = meta.rule_params
    if bin_width is None:  # about 40 bins over the longest response of these runs
        bin_width = auto_bin_width(max_response_length(sources))
    doc = _Doc(out)
    names = []
    for i, src in enumerate(sources):
        name = run_name(src, f"run{i}")
        while name in names:
            name = f"{name}_{i}"
        names.append(name)
    doc.parts.append(f"<h1>{html.escape(title)}</h1>")
    doc.p(f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} for {len(sources)} run(s): "
          + ", ".join(f"<code>{html.escape(n)}</code>" for n in names)
          + (f"; steps {step_range[0]}..{step_range[1]}" if step_range else "") + ".")
    doc.p("Statistics: quantiles use linear interpolation between order statistics (numpy's default); the "
          "<b>tail drawn in the divergence figures is the top-10% mean</b>, the mean of the tokens with D &ge; "
          "the bin's P90 (the tables also give P90 and P99); the Hill index uses the exceedances over the bin's "
          "P90 and is reported only for the unbounded |log &pi; &minus; log &mu;| (|&pi; &minus; &mu;| lies in [0, 1]: "
          "it has no power-law tail); the CPPO threshold overlay is the bin mean of &delta; / w<sub>t</sub>, drawn "
          "on the same axis as |&pi; &minus; &mu;| (both are probabilities). For runs with several optimiser "
          "updates per batch every table and figure pools the updates after the first of each batch unless "
          "stated otherwise: in the first, &pi; = &mu;, which would dilute the divergence and the masked fraction.")

    from cppo_diag.analyses.doctor import report_section  # doctor findings and the mismatch metric family

    doc.parts.append(report_section(sources, names, out, progress=progress))

    # -- comparison across runs and rules -------------------------------------------------------------
    cmp = compare_runs(sources, rules, params=params, names=names, step_range=step_range, bin_width=bin_width,
                       progress=progress, updates=updates, profiles=profiles)
    doc.h(2, "Runs × rules")
    doc.p("Every rule recomputed on the same logged tokens (<code>applied:&lt;rule&gt;</code> rows: the mask the "
          "trainer logged in <code>keep_applied</code>; <code>cppo[&lt;profile&gt;]</code> rows: CPPO under a named "
          "parameter set). The <code>updates</code> column says which optimiser updates each row pools.")
    doc.table(cmp.summary)
    doc.fig(P.fig_compare(cmp.summary), "compare_masked_frac", "Masked fraction of each rule on each run.")
    doc.fig(P.fig_masked_by_position(cmp.by_position), "compare_masked_by_position",
            "Masked fraction by position bin (dotted: the applied mask).")
    doc.fig(P.fig_masked_by_step(cmp.by_step), "compare_masked_by_step", "Masked fraction per training step.")

    for name, src in zip(names, sources):
        slug = _slug(name)
        meta = run_meta(src)
        lf = load_tokens(src)
        doc.h(2, f"Run {name}")
        upd = resolve_updates(src, updates)
        doc.p(f"trainer <code>{html.escape(str(meta.trainer))}</code>, applied rule "
              f"<code>{html.escape(str(meta.rule))}</code> {html.escape(str(meta.rule_params or ''))}, "
              f"anchor <code>{html.escape(meta.anchor)}</code>.")
        doc.p(f"Updates: <b>{html.escape(UPDATE_LABELS[upd])}</b>. {html.escape(updates_note(upd))}", "note")
        cp = _cppo_params(meta, params)
        cp = {**cppo_defaults, **{k: v for k, v in cp.items() if v is not None}}
        delta, w_min = float(cp["delta"]), float(cp["w_min"])
        pos = position_summary(src, bin_width=bin_width, step_range=step_range, delta=delta, w_min=w_min,
                             updates=upd, progress=progress)
        if pos.is_empty():
            doc.p("This run has no token rows in the selected steps; nothing to analyse.", "note")
            continue
        doc.h(3, "Divergence by position (paper Fig. 2)")
        doc.fig(P.fig_position_divergence(pos, metric="tv", tail="top10_mean"), f"{slug}_position_tv",
                f"|π − μ| by position: bin mean and top-10% mean, with CPPO's threshold δ / w<sub>t</sub> "
                f"(δ = {delta:g}, w_min = {w_min:g}) on the same axis (all three are probabilities).")
        doc.fig(P.fig_position_divergence(pos, metric="abs_logratio", tail="p90"), f"{slug}_position_logratio",
                "|log π − log μ| by position: bin mean and P90.")
        doc.fig(P.fig_position_survival(pos, metric="tv"), f"{slug}_position_survival",
                "P(|π − μ| > x) by position for several thresholds x (log scale: bins where no token exceeds x are not drawn).")
        doc.fig(P.fig_position_hill(pos, metric="abs_logratio"), f"{slug}_position_hill",
                "Hill tail index of |log π − log μ| per position bin (threshold: the bin's P90; not reported for "
                "the bounded |π − μ|).")
        doc.table(pos.filter(pl.col("metric") == "tv").drop("metric"))

        doc.h(3, "CPPO prefix budget (paper Fig. 7)")
        bud = budget_exhaustion(src, params=cp, step_range=step_range, bin_width=bin_width, updates=upd,
                                progress=progress, engine="local")  # groups of steps, cached beside the run
        doc.fig(P.fig_budget_by_step(bud.by_step), f"{slug}_budget_by_step",
                "Mean realised δ_b per response and the share of masks due to the prefix budget, per step.")
        doc.fig(P.fig_first_reject(bud.first_reject), f"{slug}_first_reject",
                "Kaplan-Meier survival of the first budget rejection of an away token (responses never rejected "
                "are censored at their length).")
        doc.fig(P.fig_slack(bud.slack, delta=delta), f"{slug}_slack", "Slack c_t by position bin.")

        doc.h(3, "Train/rollout mismatch")
        try:
            mm = mismatch_by_position(src, bin_width=bin_width, step_range=step_range, progress=progress)
            doc.fig(P.fig_mismatch(mm), f"{slug}_mismatch",
                    "|π_old − μ| by position, over all updates (π_old is fixed for a batch's updates).")
        except MissingColumnError as exc:
            doc.p(html.escape(str(exc), quote=False), "note")

        if whatif:
            doc.h(3, "What-if: CPPO parameters")
            base = {k: v for k, v in cp.items() if k not in ("delta", "delta_b", "w_min")}
            sweep = whatif_sweep(src, base_params=base, step_range=step_range, updates=upd, progress=progress)
            doc.fig(P.fig_whatif(sweep, value="masked_frac", w_min=w_min), f"{slug}_whatif_masked",
                    f"Masked fraction over (δ, δ_b) at w_min = {w_min:g}.")
            doc.fig(P.fig_whatif(sweep, value="budget_share", w_min=w_min), f"{slug}_whatif_budget",
                    f"Budget-mask share over (δ, δ_b) at w_min = {w_min:g}.")
        if "keep_applied" in columns_of(lf):
            row = cmp.summary.filter((pl.col("run") == name) & pl.col("applied"))
            if row.height:
                doc.p(f"Logged mask: {_fmt(row['masked_frac'][0])} of valid tokens masked.")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(doc.parts)}</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
