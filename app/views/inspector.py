"""Token inspector: one response of one step, its tokens coloured by divergence, masked tokens marked with
their reason, values on hover, and the CPPO internals (w_t, Z_t, c_t, S_t) plotted under the text. For rules
that weight the loss instead of masking (cppo_soft, cispo), the logged ``loss_weight`` is shown too.

Only the selected step's token rows are read (``data.step_tokens``)."""

from __future__ import annotations

import numpy as np
import polars as pl
import streamlit as st

from cppo_diag.analyses import plots_plotly as pp
from cppo_diag.analyses import responses
from cppo_diag.app import controls, data, ui
from cppo_diag.masks.reasons import Reason

view_slot, settings = ui.figure_first(
    "Token inspector", "One response, token by token: the background is |π − μ| at that token, underlines mark the "
    "tokens the rule masked (and why), and the CPPO internals w_t, Z_t, c_t, S_t run under the text.")
with settings:
    path = ui.focus_run()
    steps = data.completed_steps(path) or data.token_steps(path)
    ui.need(bool(steps), "This run has no token rows yet.")
    c1, c2, c3 = st.columns([1, 1, 2])
    step = c1.selectbox("Step", steps[::-1], key="insp_step")
    applied = controls.has_applied(path) and "reason_applied" in data.token_columns(path)
    sources = (["applied mask"] if applied else []) + ["recomputed " + r for r in controls.recompute_rules()
                                                          if r.startswith("cppo")]
    mark = c2.selectbox("Mark masked tokens by", sources, key="insp_mark")
    defaults = controls.rule_defaults(path)
    params = {k: float(defaults[k]) for k in ("delta", "delta_b", "w_min")}
    if "delta_b_mode" in defaults:
        params["delta_b_mode"] = defaults["delta_b_mode"]
    c3.caption("CPPO internals use " + ", ".join(f"{k}={v}" for k, v in params.items())
               + " (the run's parameters when it applied CPPO).")

    tokens = data.step_tokens(path, step)
    ui.need(tokens.height > 0, f"Step {step} has no token rows.")
    # Masks of the whole step (for the masked counts of the search): the logged one, or a rule recomputed on
    # this step only. The CPPO internals are recomputed below for the chosen response alone.
    marks = None if mark == "applied mask" else data.step_rule(path, step, mark.removeprefix("recomputed "), params)
    frame = responses.marked_tokens(tokens, marks)

    # -- pick a sequence ---------------------------------------------------------------------------------------
    seq_table = data.step_sequences(path, step)
    seqs = responses.response_table(frame, seq_table)

    with st.expander("Search sequences", expanded=True):
        f1, f2, f3, f4 = st.columns(4)
        lmin, lmax = int(seqs["length"].min()), int(seqs["length"].max())
        length = f1.slider("Length", lmin, max(lmax, lmin + 1), (lmin, max(lmax, lmin + 1)), key="insp_len")
        min_masked = f2.number_input("Masked tokens ≥", min_value=0, value=0, key="insp_minmasked")
        rewards = sorted(v for v in seqs["reward"].unique().to_list() if v is not None)
        reward_pick = f3.multiselect("Reward", rewards, key="insp_reward", help="empty = any")
        order = f4.selectbox("Sort by", list(responses.SORT_KEYS), key="insp_sort")
    found = responses.find_responses(seqs, length=length, min_masked=min_masked, rewards=reward_pick, order=order)
    ui.need(found.height > 0, "No sequence matches the search.")
    multi = frame.select(pl.struct("update", "rank").n_unique()).item() > 1
    # Options are sequence identities, not list positions: a position would silently point at another response
    # (under a stale label) when the step, the marks or the search change.
    labels = {
        f"{r['update']}:{r['rank']}:{r['seq_id']}": (
            f"seq {r['seq_id']}" + (f" (update {r['update']}, rank {r['rank']})" if multi else "")
            + f" · len {r['length']} · masked {r['masked']} · reward "
            + ("–" if r["reward"] is None else f"{r['reward']:.3g}") + f" · max|π−μ| {r['max_tv']:.3f}")
        for r in found.iter_rows(named=True)
    }
    context = (path, step, mark)
    if st.session_state.get("_insp_context") != context or st.session_state.get("insp_seq") not in labels:
        st.session_state["_insp_context"] = context
        st.session_state["insp_seq"] = next(iter(labels))
    pick = st.selectbox(f"Sequence ({found.height} of {seqs.height})", list(labels), format_func=labels.get,
                        key="insp_seq")
    update, rank, seq_id = (int(v) for v in pick.split(":"))
    row = responses.select_response(found, update, rank, seq_id).row(0, named=True)
    seq = responses.response_tokens(frame, update, rank, seq_id)
    internals = data.sequence_rule(path, step, update, rank, seq_id, "cppo", params)
    if internals.height:
        seq = seq.join(internals.select("pos", *[c for c in ("w", "Z", "S", "c", "delta_b") if c in internals.columns]),
                       on="pos", how="left")

with view_slot:
    # -- text ----------------------------------------------------------------------------------------------------
    texts = responses.token_texts(seq, seq_table, row["seq_id"])
    scale = responses.divergence_scale(frame)
    REASON_STYLE = {Reason.TOKEN: "border-bottom:3px solid #d62728;", Reason.BUDGET: "border-bottom:3px dashed #ff7f0e;",
                    Reason.SEQUENCE: "outline:1px solid #7f7f7f;"}
    spans = []
    for r in seq.iter_rows(named=True):
        a = min(float(r["tv"]) / scale, 1.0)
        reason = int(r["m_reason"] or Reason.KEPT) if r["m_keep"] is not None and not r["m_keep"] else int(Reason.KEPT)
        title = (f"pos {r['pos']} | π {np.exp(r['logp']):.4f} | μ {np.exp(r['logp_rollout']):.4f} | "
                 f"|π−μ| {r['tv']:.4f} | A {r['advantage']:.3f}")
        for name, lab in (("w", "w_t"), ("Z", "Z_t"), ("c", "c_t"), ("S", "S_t")):
            if r.get(name) is not None:
                title += f" | {lab} {r[name]:.4f}"
        if r.get("loss_weight") is not None:
            title += f" | loss weight {r['loss_weight']:.4f}"
        title += f" | {controls.REASON_LABELS.get(reason, reason)}"
        spans.append(ui.token_span(texts[r["pos"]] if r["pos"] < len(texts) else "·", title=title,
                                   css_class=f"tok r{reason}",
                                   style=f"background:rgba(31,119,180,{a:.2f});{REASON_STYLE.get(reason, '')}"))
    legend = ('<div class="legend">background: |π − μ| (full colour at the step\'s p99 = '
              f'{scale:.3g}) · <span style="{REASON_STYLE[Reason.TOKEN]}">{controls.REASON_LABELS[Reason.TOKEN]}</span> · '
              f'<span style="{REASON_STYLE[Reason.BUDGET]}">{controls.REASON_LABELS[Reason.BUDGET]}</span> · '
              'hover a token for its values</div>')
    st.html(
        "<style>.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.9;font-size:0.95rem}"
        ".tokens{overflow-wrap:anywhere;word-break:break-all}.tok{padding:1px 0;border-radius:2px}.legend{font-size:0.8rem;color:#666;margin:4px 0}</style>"
        + legend + '<div class="tokens">' + "".join(spans) + "</div>"
    )

    # -- internals under the text --------------------------------------------------------------------------------
    masked = seq["m_keep"].fill_null(True).not_().to_numpy()
    ui.plot(pp.fig_sequence_internals(seq, delta=params["delta"]), key="insp_fig")
    weight_note = ""
    if "loss_weight" in seq.columns and seq["loss_weight"].null_count() < seq.height:
        lw = seq["loss_weight"]
        weight_note = f" Loss weight applied: mean {lw.mean():.3f}, min {lw.min():.3f}, below 1 on {int((lw < 1).sum())} tokens."
    st.caption(f"{int(masked.sum())} masked of {seq.height} tokens ({mark}); advantage {row['advantage']:.3f}."
               + weight_note)
