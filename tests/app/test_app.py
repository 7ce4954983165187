"""The Streamlit app through ``streamlit.testing.v1.AppTest``: every page renders without exceptions on a
root of real runs, and its widgets change the data shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app_fixtures import build_root  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
TIMEOUT = 600  # a hang guard (AppTest waits this long per script run), far above a run on a loaded box


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("runs")
    build_root(r)
    return r


@pytest.fixture
def app(root, monkeypatch):
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(root))

    def make(page: str | None = None, select: list[str] | None = None) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        at.run()
        _ok(at)
        if select is not None:
            at.multiselect(key="selected_runs").set_value([str((root / n).resolve()) for n in select]).run()
            _ok(at)
        if page:
            at.switch_page(page).run()
            _ok(at)
        return at

    return make


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _decode(v):
    """Plotly >= 6 writes numeric arrays as {"dtype", "bdata" (base64)}: decode them to lists."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        if "shape" in v:
            a = a.reshape([int(n) for n in str(v["shape"]).split(",")])
        return a.tolist()
    return v


def traces(at: AppTest, i: int = 0) -> list[dict]:
    return [{k: _decode(v) for k, v in t.items()} for t in charts(at)[i]["data"]]


def test_runs_page_lists_runs_with_metadata(app, root):
    at = app()
    assert at.title[0].value == "Runs"
    table = at.dataframe[0].value
    assert sorted(table["run"]) == ["cppo-run", "dppo-run", "grpo-run"]
    row = table.set_index("run").loc["cppo-run"]
    assert row["rule"] == "cppo" and "delta=0.15" in row["rule_params"]
    assert row["trainer"] == "cppo-diag" and row["model"] == "toy-gpt" and row["task"] == "multi-add"
    assert row["steps"] == 5 and row["tokens"] > 0 and row["status"] == "finished"
    from cppo_diag import open_run

    logged = open_run(root / "cppo-run").steps()["reward/mean"].to_list()
    assert row["last_reward"] == pytest.approx(logged[-1]) and logged[-1] != pytest.approx(logged[0])


def test_selection_is_kept_across_pages(app, root):
    at = app(select=["dppo-run", "grpo-run"])
    expected = [str((root / n).resolve()) for n in ("dppo-run", "grpo-run")]
    assert len(at.expander) == 2  # one details expander per selected run
    at.switch_page("views/budget.py").run()
    _ok(at)
    assert at.multiselect(key="selected_runs").value == expected
    # Single-run pages offer only the selected runs.
    assert at.selectbox(key="focus_run").options == ["dppo-run", "grpo-run"]
    at.switch_page("views/runs.py").run()
    assert at.multiselect(key="selected_runs").value == expected


def test_divergence_page_statistic_and_bins_change_the_chart(app):
    at = app("views/divergence.py")
    assert len(charts(at)) == 2  # divergence by position + masked fraction by position
    mean_y = traces(at)[0]["y"]
    at.selectbox(key="div_stat").set_value("p90").run()
    _ok(at)
    p90_y = traces(at)[0]["y"]
    assert p90_y != mean_y
    n_bins = len(traces(at)[0]["x"])
    at.select_slider(key="div_bw").set_value(16).run()
    _ok(at)
    assert len(traces(at)[0]["x"]) < n_bins
    # Relative positions lie in (0, 1].
    at.radio(key="div_pos").set_value("relative").run()
    _ok(at)
    assert max(traces(at)[0]["x"]) <= 1.0
    # The masked-fraction chart has the applied mask and the recomputed rule.
    names = {t["name"] for t in traces(at, 1)}
    assert any(n.startswith("applied:") for n in names) and "dppo" in names
    assert max(x for t in traces(at, 1) for x in t["x"]) < 1.0  # masked fraction over t / T too


def test_divergence_page_advantage_sign_filters_tokens(app):
    at = app("views/divergence.py")
    all_counts = sum(c[0] for c in traces(at)[0]["customdata"])
    at.selectbox(key="div_adv").set_value("pos").run()
    _ok(at)
    pos_counts = sum(c[0] for c in traces(at)[0]["customdata"])
    assert 0 < pos_counts < all_counts


def test_budget_page_recomputes_with_other_parameters(app):
    at = app("views/budget.py")
    assert len(charts(at)) == 4  # Fig. 7 recomputed, first rejection, slack, Fig. 7 as logged (cppo-run)
    before = at.dataframe[0].value["budget_share"].tolist()
    at.number_input(key="bud_delta_b").set_value(0.0).run()
    _ok(at)
    after = at.dataframe[0].value["budget_share"].tolist()
    assert after != before


def test_compare_page_shows_each_chosen_run(app, root):
    at = app("views/compare.py")
    at.multiselect(key="cmp_runs").set_value([str((root / n).resolve()) for n in ("cppo-run", "grpo-run")]).run()
    _ok(at)
    summary = at.dataframe[0].value
    assert set(summary["run"]) == {"cppo-run", "grpo-run"}
    assert set(summary["rule"]) == {"applied:cppo", "applied:grpo_clip", "cppo"}  # applied + cppo by default
    # Small multiples (issue 24): one panel per run, one line per rule; a trace's meta is its run.
    names = {(t["meta"], t["name"]) for t in traces(at, 0)}
    assert {("cppo-run", "applied mask"), ("grpo-run", "cppo"), ("grpo-run", "applied mask")} <= names
    assert {a["text"] for a in charts(at)[0]["layout"]["annotations"]} == {"cppo-run (applied: cppo)",
                                                                          "grpo-run (applied: grpo_clip)"}
    # The reward and accuracy curves are drawn by default, under the names the trainer logs
    # (cppo_diag/train/trainer.py: "reward/mean", "acc/mean").
    assert at.multiselect(key="cmp_curves").value == ["reward/mean", "acc/mean"]
    curves = {t["name"] for t in traces(at, 2)}
    assert {"cppo-run · reward/mean", "cppo-run · acc/mean", "grpo-run · acc/mean"} <= curves


def test_compare_page_relative_positions(app, root):
    at = app("views/compare.py")
    at.multiselect(key="cmp_runs").set_value([str((root / n).resolve()) for n in ("cppo-run", "dppo-run")]).run()
    _ok(at)
    xs = [x for t in traces(at, 0) for x in t["x"]]
    assert max(xs) > 1  # absolute: bin starts in token positions
    at.radio(key="cmp_pos").set_value("relative").run()
    _ok(at)
    spec = charts(at)[0]  # masked fraction by position: the page's first figure
    xs = [x for t in traces(at, 0) for x in t["x"]]
    assert 0 <= min(xs) and max(xs) < 1 and len(set(xs)) > 5  # t / T bins
    titles = [v["title"]["text"] for k, v in spec["layout"].items() if k.startswith("xaxis") and "title" in v]
    assert titles and all("relative" in t for t in titles)
    names = {(t["meta"], t["name"]) for t in traces(at, 0)}
    assert ("cppo-run", "applied mask") in names and ("dppo-run", "cppo") in names


def _seq_value(label: str) -> str:
    """The selectbox value ("update:rank:seq_id") of an inspector option label (fixtures: update 0, rank 0)."""
    return f"0:0:{int(label.split(' · ')[0].removeprefix('seq '))}"


def test_inspector_page_marks_tokens_and_escapes_text(app):
    at = app("views/inspector.py")
    body = at.get("html")[0].value
    assert body.count('class="tok') > 8
    assert " <b>" not in body and "title=" in body  # token text is escaped, values on hover
    assert "<script" not in body and "&amp;amp;" not in body  # escaped exactly once
    assert "&lt;script&gt;" in body or " &amp;" in body
    first = body
    options = at.selectbox(key="insp_seq").options
    assert len(options) > 1
    at.selectbox(key="insp_seq").set_value(_seq_value(options[1])).run()
    _ok(at)
    assert at.get("html")[0].value != first
    # Internals under the text: w_t, Z_t, c_t, S_t.
    names = {t.get("name") for t in traces(at)}
    assert {"w_t", "Z_t", "c_t", "S_t"} <= names


def test_inspector_slack_has_its_own_axis_with_its_full_range(app):
    """c_t falls far below zero once the budget is spent: it gets its own panel, whose y range is not
    clipped (an unset range autoscales to every value), and the panel is labelled."""
    at = app("views/inspector.py")
    spec = charts(at)[0]
    c = next(t for t in spec["data"] if t.get("name") == "c_t")
    z = next(t for t in spec["data"] if t.get("name") == "Z_t")
    assert c.get("yaxis", "y") != z.get("yaxis", "y")
    axis = spec["layout"]["yaxis" + c["yaxis"][1:]]
    assert "range" not in axis and axis["title"]["text"] == "c_t"
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    assert any(t.startswith("slack c_t") for t in titles)


def test_token_span_escapes_exactly_once():
    from html.parser import HTMLParser

    from cppo_diag.app.ui import token_span

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.text, self.tags, self.attrs = "", [], {}

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "span":
                self.attrs = dict(attrs)

        def handle_data(self, data):
            self.text += data

    for raw in ("<script>alert(1)</script>", "&", "&amp;", '"q"', "a\"b' onmouseover='x", "<b>", "plain"):
        parsed = Collect()
        parsed.feed(token_span(raw, title=f'pos 1 | {raw}', css_class="tok r0", style="color:red"))
        assert parsed.text == raw  # what the browser shows is the token as written
        assert parsed.tags == ["span"]  # no markup injected
        assert parsed.attrs["title"] == f"pos 1 | {raw}" and parsed.attrs["class"] == "tok r0"
    parsed = Collect()
    parsed.feed(token_span("a\nb", title="t", css_class="tok", style=""))
    assert parsed.text == "a↵b" and parsed.tags == ["span", "br"]


def test_inspector_search_filters_sequences(app):
    at = app("views/inspector.py")
    n_all = len(at.selectbox(key="insp_seq").options)
    at.number_input(key="insp_minmasked").set_value(1).run()
    _ok(at)
    n_masked = len(at.selectbox(key="insp_seq").options)
    assert n_masked <= n_all
    for label in at.selectbox(key="insp_seq").options:
        assert "masked 0 " not in label


def test_whatif_sliders_change_the_masked_fraction(app):
    at = app("views/whatif.py")
    frac = at.metric[0].value
    at.slider(key="wi_delta").set_value(0.02).run()
    _ok(at)
    assert at.metric[0].value != frac
    at.selectbox(key="wi_rule").set_value("dppo").run()
    _ok(at)
    assert "dppo" in at.metric[0].label


def test_empty_root_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    _ok(at)
    assert "No runs found" in at.info[0].value


def test_live_run_is_marked_and_refreshes(tmp_path, monkeypatch):
    from tests.app_fixtures import write_run

    path, rec = write_run(tmp_path, "live-run", "cppo", {"delta": 0.15}, n_steps=2, close=False)
    try:
        monkeypatch.setenv("CPPO_DIAG_ROOTS", str(tmp_path))
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
        _ok(at)
        row = at.dataframe[0].value.set_index("run").loc["live-run"]
        assert row["status"] == "live" and row["steps"] == 2
        assert not at.sidebar.toggle(key="auto_refresh").disabled  # the timer is offered for live runs
        at.sidebar.toggle(key="auto_refresh").set_value(True).run()
        _ok(at)
        # The trainer completes another step; the next rerun (Refresh, or the timer) shows it.
        import numpy as np

        logp = np.log(np.full((2, 4), 0.5, dtype=np.float32))
        rec.log_tokens(step=2, logp=logp, logp_rollout=logp, advantages=np.array([1.0, -1.0], dtype=np.float32))
        rec.end_step(2)
        rec.flush()
        at.sidebar.button[0].click().run()
        _ok(at)
        assert at.dataframe[0].value.set_index("run").loc["live-run", "steps"] == 3
    finally:
        rec.close()
    at.run()
    assert at.dataframe[0].value.set_index("run").loc["live-run", "status"] == "finished"


def test_divergence_overlay_follows_delta_and_w_min(app):
    at = app("views/divergence.py")

    def overlay() -> list[float]:
        return next(t["y"] for t in traces(at) if str(t.get("name", "")).startswith("δ / w_t"))

    base = overlay()
    assert base[0] == pytest.approx(0.15, rel=0.05)  # w_1 = 1 at the first position
    at.number_input(key="div_delta").set_value(0.3).run()
    _ok(at)
    assert overlay() == pytest.approx([2 * v for v in base])
    at.slider(key="div_wmin").set_value(0.5).run()
    _ok(at)
    assert overlay()[-1] > 2 * base[-1]  # a lower w_min raises delta / w_t at late positions


def test_whatif_sweep_draws_the_grid(app):
    at = app("views/whatif.py")
    n = len(charts(at))
    at.toggle(key="wi_sweep").set_value(True).run()
    _ok(at)
    assert len(charts(at)) == n + 1


def test_inspector_label_matches_the_shown_response_after_a_step_change(app):
    at = app("views/inspector.py")
    box = at.selectbox(key="insp_seq")
    box.set_value(_seq_value(box.options[2])).run()
    _ok(at)
    at.selectbox(key="insp_step").select_index(1).run()
    _ok(at)
    box = at.selectbox(key="insp_seq")
    label = box.options[box.index]
    length = int(label.split(" · len ")[1].split(" ")[0])
    masked = int(label.split(" · masked ")[1].split(" ")[0])
    assert any(f"{masked} masked of {length} tokens" in c.value for c in at.main.caption)


# -- runs linked into a root (issue 11, item 11) -------------------------------------------------------------


@pytest.fixture
def linked_root(tmp_path, monkeypatch):
    """A root whose only run is a symbolic link to a run on "shared storage" outside every root."""
    from tests.app_fixtures import write_run

    shared = tmp_path / "shared"
    shared.mkdir()
    for i, name in enumerate(("far-run", "other-run")):
        write_run(shared, name, "cppo", {"delta": 0.15, "w_min": 0.8, "delta_b": 0.02}, n_steps=2, seed=i)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(shared / "far-run", target_is_directory=True)
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(root))
    return root, shared


def test_run_linked_into_a_root_opens_on_every_page(linked_root):
    """A link the user placed inside a root counts as inside: listed under its link name, and every page
    opens it (today the listing shows it and the pages raise PermissionError)."""
    root, _ = linked_root
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    _ok(at)
    (row,) = at.dataframe[0].value.to_dict("records")
    assert row["status"] == "finished" and row["steps"] == 2
    for page in ("views/divergence.py", "views/budget.py", "views/inspector.py", "views/compare.py",
                 "views/whatif.py"):
        at.switch_page(page).run()
        _ok(at)
        assert not at.error, (page, [e.value for e in at.error])
        assert charts(at), page
    assert row["run"] == "linked"  # listed under the name the user gave the link
    assert at.multiselect(key="selected_runs").options == ["linked"]  # the labels


def test_link_repointed_after_the_listing_is_refused_in_one_sentence(linked_root):
    """The pages admit what the listing admitted: a link re-pointed elsewhere after the listing is refused
    until Refresh, with one plain sentence on the page instead of a traceback."""
    root, shared = linked_root
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    _ok(at)
    (root / "linked").unlink()
    (root / "linked").symlink_to(shared / "other-run", target_is_directory=True)
    at.switch_page("views/divergence.py").run()
    _ok(at)
    (msg,) = [e.value for e in at.error]
    assert "outside the app's roots" in msg and "Traceback" not in msg and msg.count(". ") == 0
    at.sidebar.button[0].click().run()  # Refresh: the new target is the listed run now
    _ok(at)
    assert not at.error and charts(at)


def test_confine_admits_listed_links_only(linked_root, tmp_path):
    from cppo_diag.app import data

    root, shared = linked_root
    assert data.confine(root / "linked", [root]) == root / "linked"  # named as listed, not by its target
    assert data.confine(shared / "far-run" / "meta.json", [root]) == root / "linked" / "meta.json"
    assert data.confine("linked", [root]) == root / "linked"
    for outside in (shared / "other-run", shared, root / "linked" / ".." / "other-run"):
        with pytest.raises(PermissionError, match="outside the app's roots"):
            data.confine(outside, [root])
    (root / "not-a-run").symlink_to(tmp_path, target_is_directory=True)  # a link, but not to a run
    with pytest.raises(PermissionError, match="outside"):
        data.confine(root / "not-a-run", [root])


# -- the app server's lifetime under `cppo-diag demo` (issue 11, item 10) --------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_freed(port: int, within: float) -> bool:
    import time

    from cppo_diag.cli import app_cmd

    deadline = time.monotonic() + within
    while True:
        try:
            app_cmd.check_port_free(port)
            return True
        except app_cmd.PortInUseError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _demo(tmp_path, port: int, *extra: str):
    import os
    import subprocess
    import sys

    (tmp_path / "no-samples").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "cppo_diag.cli.main", "demo", "--no-browser", "--out", str(tmp_path / "out"),
           "--samples", str(tmp_path / "no-samples"), "--port", str(port), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # the demo leaves SIGHUP alone when it is ignored (started under nohup, as a user would want); a test suite
    # itself started under nohup passes that on, so give the demo the default disposition, as from a terminal
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sighup)


def _default_sighup() -> None:
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP", "SIGKILL"])
def test_demo_stopped_by_a_signal_frees_the_app_port(tmp_path, sig):
    """However the demo process ends, its Streamlit child ends with it and the port is free for the next
    `make demo` (today SIGTERM and SIGKILL leave the server serving; SIGINT is ignored by a demo started as
    a background job). SIGKILL reaches no handler: the server learns it from the kernel (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess

    from cppo_diag.cli import app_cmd

    port = _free_port()
    proc = _demo(tmp_path, port, "--steps", "500")  # trains far longer than the test waits
    try:
        app_cmd.wait_until_healthy(port, timeout=600)
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=300)
        assert _port_freed(port, within=120), f"the app still holds port {port} after the demo got {sig}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def test_demo_reports_a_port_in_use_before_training(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _demo(tmp_path, port, "--steps", "1")
        out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 2, err[-2000:]
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
    assert "Traceback" not in err and not list((tmp_path / "out").iterdir())  # nothing trained


@pytest.mark.slow
def test_serving_stops_the_server_when_the_block_raises(root):
    from cppo_diag.cli import app_cmd

    port = _free_port()
    with pytest.raises(RuntimeError, match="boom"):
        with app_cmd.serving([str(root)], port=port, quiet=True) as proc:
            app_cmd.wait_until_healthy(port, proc, timeout=600)
            raise RuntimeError("boom")
    assert proc.poll() is not None and _port_freed(port, within=120)


def test_app_command_reports_a_port_in_use(root, capsys):
    import socket

    from cppo_diag.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--root", str(root), "--port", str(port), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
