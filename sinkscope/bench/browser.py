"""The app's speed in a real browser (`python -m sinkscope.bench browser`): `streamlit run` on a free port, driven
by headless Chromium through playwright, over three real SmolLM2 traces (made once, resumable, under
`traces/bench/`):

- `long-2048`: one 2,048-token sample;
- `prompts-1000` and `prompts-1000-bf16`: the same 1,000 short prompts in float32 and in bfloat16 (a Compare pair).

An interaction is timed from the click or key press that starts a script run (for a selectbox, the click on its
option: opening it and typing its filter happen before the clock starts, as a user's typing does) until the page
has settled: the script run it triggers has
ended (Streamlit's `script_finished` message on the page's websocket), no element waits for its code any more (no
skeleton), every Plotly chart on the page has drawn, and the document has not changed for `QUIET_MS`; the time
reported ends at the page's last change (a `MutationObserver` over the whole document), not at the end of the
quiet period. Plotly's code is loaded lazily and draws after the run has ended, so the end of the run alone is too
early, above all for the first render. The first render is timed the same way from `page.goto` on a freshly
started server (empty caches). Targets (issue 14): every interaction <= 1 s, the first render <= 3 s."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import typer

from sinkscope.bench import app
from sinkscope.bench.speed import write_prompt_trace

LONG_TEXT = ("Attention sinks form at the first token of a sequence, and massive activations appear in a few fixed "
             "feature dimensions of the residual stream. Speech recognition with a large language model compresses "
             "audio and video into tokens before the decoder reads them; the decoder then writes the transcript. ")


def write_long_trace(path: Path, n_tokens: int = 2048, model_name: str = "smollm2-135m") -> Path:
    """A real trace of one `n_tokens`-token text (repeated prose, truncated), resumable."""
    from sinkscope.models.llm import load_llm
    from sinkscope.record.run import record_texts

    llm, tok = load_llm(model_name)
    text = LONG_TEXT * (4 * n_tokens // len(tok(LONG_TEXT)["input_ids"]) + 1)
    record_texts(llm, tok, [text], path, resume=True, max_length=n_tokens, config={"model": model_name})
    return path


def make_traces(root: Path, samples: int, long_tokens: int) -> dict[str, Path]:
    import torch

    traces = {"long": root / f"long-{long_tokens}", "many_a": root / f"prompts-{samples}",
              "many_b": root / f"prompts-{samples}-bf16"}
    write_long_trace(traces["long"], long_tokens)
    write_prompt_trace(traces["many_a"], samples)
    write_prompt_trace(traces["many_b"], samples, dtype=torch.bfloat16)
    from sinkscope.trace.columns import INDEX, write_index

    for path in traces.values():  # as a recording run leaves them (traces made before the index existed lack it)
        if not (path / INDEX).is_file():
            write_index(path)
    return traces


class Page:
    """A playwright page on the app that counts finished script runs (websocket `script_finished` messages)."""

    def __init__(self, browser, url: str):
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.finished = 0
        self.page = browser.new_page(viewport={"width": 1500, "height": 1100})

        self.bytes = 0

        def on_frame(payload) -> None:
            if isinstance(payload, str):
                return
            self.bytes += len(payload)
            msg = ForwardMsg()
            try:
                msg.ParseFromString(payload)
            except Exception:  # noqa: BLE001 - other binary frames are not ours to read
                return
            if msg.WhichOneof("type") == "script_finished":
                self.finished += 1

        self.page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
        self.page.add_init_script(self.WATCH)
        self.url = url

    LONG_TASKS = ("() => { if (window.__sinkscopeTasks) return; window.__sinkscopeTasks = [];"
                  " new PerformanceObserver(l => { for (const e of l.getEntries())"
                  " window.__sinkscopeTasks.push([e.startTime, e.duration]); })"
                  ".observe({type: 'longtask', buffered: true}); }")

    def busy_since(self, t0: float) -> float:
        """Seconds of the page's long tasks (main-thread work over 50 ms: script, layout, Plotly drawing) that
        started after page time `t0` (ms): the browser's own share of an interaction."""
        return self.page.evaluate("t0 => (window.__sinkscopeTasks || []).filter(e => e[0] >= t0)"
                                  ".reduce((s, e) => s + e[1], 0) / 1000", t0)

    QUIET_MS = 400
    """The page counts as settled once it has not changed for this long (ms)."""

    # installed in every document before its own scripts: the epoch time (ms) of the document's last change
    WATCH = ("(() => { window.__sinkscopeLast = performance.timeOrigin + performance.now();"
             " new MutationObserver(() => { window.__sinkscopeLast = performance.timeOrigin + performance.now(); })"
             ".observe(document, {subtree: true, childList: true, attributes: true, characterData: true}); })();")

    # drawn: no element is still waiting for its lazily loaded code (Streamlit shows a skeleton meanwhile) and every
    # Plotly chart has its SVG
    SETTLED = ("quiet => { const c = [...document.querySelectorAll('[data-testid=stPlotlyChart]')];"
               " const drawn = !document.querySelector('[data-testid=stSkeleton]')"
               " && c.every(e => e.querySelector('.main-svg'));"
               " const now = performance.timeOrigin + performance.now();"
               " return drawn && now - window.__sinkscopeLast >= quiet ? window.__sinkscopeLast : null; }")

    def timed(self, action: Callable[[], None], timeout: float = 120.0) -> float:
        """Seconds from `action` until the page settled (module docstring): the run it starts has ended, every
        chart has drawn, and the last change to the document is reported. `last_run_s` is the time to the end of
        the script run alone; `last_busy_s` is the part the browser's main thread spent in long tasks (0 for the
        page load, which installs that observer)."""
        before = self.finished
        self.bytes = 0
        try:
            t0 = self.page.evaluate("() => performance.now()")
        except Exception:  # noqa: BLE001 - no document yet (before the first goto)
            t0 = None
        start_epoch = time.time()
        start = time.perf_counter()
        action()
        while self.finished <= before:
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"no script run finished within {timeout:.0f} s")
            self.page.wait_for_timeout(5)
        self.last_run_s = time.perf_counter() - start
        last = self.page.wait_for_function(self.SETTLED, arg=self.QUIET_MS, polling=20,
                                           timeout=timeout * 1000).json_value()
        elapsed = max(last / 1000 - start_epoch, self.last_run_s)
        self.check()
        self.page.evaluate(self.LONG_TASKS)
        self.last_busy_s = self.busy_since(t0) if t0 is not None else 0.0
        return elapsed

    def check(self) -> None:
        if self.page.locator('[data-testid="stException"]').count():
            raise RuntimeError("the app shows an exception: " + self.page.locator('[data-testid="stException"]')
                               .first.inner_text()[:2000])

    # the app's controls
    def view(self, name: str) -> None:
        self.page.locator('[data-testid="stSidebar"]').get_by_text(name, exact=True).click()

    def select(self, label_start: str, option: str, sidebar: bool = False) -> None:
        self.open_select(label_start, option, sidebar)
        self.choose(option)

    def open_select(self, label_start: str, option: str, sidebar: bool = False) -> None:
        """Open a selectbox and type `option` into its filter (long lists are virtualised): what a user does
        before the click that changes anything, so the benchmark does it before its clock starts."""
        scope = self.page.locator('[data-testid="stSidebar"]') if sidebar else self.page
        box = scope.locator('[data-testid="stSelectbox"]').filter(has_text=label_start).first
        box.click()
        self.page.keyboard.type(option)
        self.page.get_by_role("option").filter(has_text=option).first.wait_for()

    def choose(self, option: str) -> None:
        """Click the open selectbox's option `option` (after `open_select`)."""
        self.page.get_by_role("option").filter(has_text=option).first.click()

    def radio(self, label_start: str, option: str) -> None:
        """Click `option` of the radio group whose label starts with `label_start`."""
        group = self.page.locator('[data-testid="stRadio"]').filter(has_text=label_start).first
        group.get_by_text(option, exact=True).click()

    def slider_step(self, label_start: str, key: str = "ArrowRight") -> None:
        slider = self.page.locator('[data-testid="stSlider"]').filter(has_text=label_start).first
        slider.get_by_role("slider").first.press(key)

    def toggle(self, label_start: str) -> None:
        self.page.locator('[data-testid="stCheckbox"]').filter(has_text=label_start).first.click()

    def click_bar(self, index: int) -> None:
        chart = self.page.locator('[data-testid="stPlotlyChart"]').first
        box = chart.locator(".barlayer .point path").nth(index).bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + 4
        self.page.mouse.move(x, y - 3)
        self.page.mouse.move(x, y, steps=3)
        self.page.mouse.click(x, y)


Step = tuple[str, Callable[[Page], None], Callable[[Page], None] | None]
"""(label, action, what runs before the action's clock starts or None)."""


def _pick(label: str, box: str, option: str, sidebar: bool = False) -> Step:
    """A selectbox step: its action is the click on `option`; opening `box` and typing the filter
    (`Page.open_select`) happen before the clock starts, since no script runs until the option is clicked."""
    return (label, lambda p: p.choose(option), lambda p: p.open_select(box, option, sidebar))


def script(names: dict[str, str]) -> list[Step]:
    """The interactions, in order: (label, action, before). Each action starts one script run."""
    long, a, b = names["long"], names["many_a"], names["many_b"]
    steps: list[tuple] = []
    for view in ("Attention", "Massive activations"):
        steps.append((f"{long}: view {view}", lambda p, v=view: p.view(v)))
    steps += [
        (f"{long}: Massive, click the 2nd feature bar", lambda p: p.click_bar(1)),
        (f"{long}: Massive, tokens x features on", lambda p: p.toggle("Tokens x features")),
        (f"{long}: Massive, layer slider +1", lambda p: p.slider_step("Layer for tokens")),
        (f"{long}: Massive, MLP toggle", lambda p: p.toggle("MLP output")),
        (f"{long}: Massive, top features +4", lambda p: p.slider_step("Top features")),
    ]
    for view in ("Cosine to BOS", "Overview", "Dataset"):
        steps.append((f"{long}: view {view}", lambda p, v=view: p.view(v)))
    steps += [
        _pick(f"switch trace to {a} (Dataset)", "Trace", a, sidebar=True),
        (f"{a}: Dataset, cosine layer +1", lambda p: p.slider_step("Layer for the cosine")),
        (f"{a}: view Overview", lambda p: p.view("Overview")),
        _pick(f"{a}: next sample", "Sample", "00001-", sidebar=True),
        (f"{a}: view Massive activations", lambda p: p.view("Massive activations")),
        (f"{a}: view Compare (B = {b})", lambda p: p.view("Compare")),
        (f"{a} vs {b}: whole traces, massive activations", lambda p: p.radio("Whole-trace part",
                                                                             "Massive activations")),
        (f"{a} vs {b}: whole traces, sink positions", lambda p: p.radio("Whole-trace part", "Sink positions")),
        (f"{a} vs {b}: whole traces, sinks and cos to BOS", lambda p: p.radio("Whole-trace part",
                                                                              "Sinks and cos to BOS")),
        (f"{a} vs {b}: sink threshold +0.05", lambda p: p.slider_step("Sink threshold", "ArrowRight")),
        (f"{a} vs {b}: sink threshold back", lambda p: p.slider_step("Sink threshold", "ArrowLeft")),
        (f"{a} vs {b}: one sample in both", lambda p: p.page.get_by_text("One sample in both", exact=True).click()),
        _pick(f"{a} vs {b}: paired sample", "Paired sample", "00002-"),
        _pick("switch trace to long (Compare)", "Trace", long, sidebar=True),
        (f"{long}: view Overview", lambda p: p.view("Overview")),
    ]
    return [step if len(step) == 3 else (*step, None) for step in steps]


FLOOR_PAGES = {
    "text only": 'import streamlit as st\nst.write("hello")\n',
    "one 3-point Plotly chart": ('import plotly.graph_objects as go\nimport streamlit as st\nst.write("hello")\n'
                                 'st.plotly_chart(go.Figure(go.Scatter(x=[1, 2, 3], y=[1, 3, 2])))\n'),
}
"""Bare Streamlit pages whose first render bounds the app's from below on the same machine and browser."""


def floor_first_render(browser, reps: int) -> dict[str, list[float]]:
    """First render of each FLOOR_PAGES page on a freshly started server, `reps` times each."""
    import tempfile

    from sinkscope.browser import serve_app

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, code in FLOOR_PAGES.items():
            script = Path(tmp) / f"floor_{len(times)}.py"
            script.write_text(code)
            times[label] = []
            for _ in range(reps):
                with serve_app(tmp, script=str(script)) as url:
                    page = Page(browser, url)
                    times[label].append(page.timed(lambda pg=page, u=url: pg.page.goto(u)))
                    page.page.close()
            print(f"  floor: {label}: first render {[round(t, 2) for t in times[label]]} s", flush=True)
    return times


def run_browser(root: Path, names: dict[str, str], reps: int, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    from sinkscope.browser import CHROMIUM_ARGS, serve_app

    first, rounds, details = [], [], []
    steps = script(names)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        floor = floor_first_render(browser, reps)
        for rep in range(reps):
            with serve_app(root) as url:  # a fresh server: empty caches
                page = Page(browser, url)
                first.append(page.timed(lambda pg=page: pg.page.goto(url)))
                page.page.wait_for_selector('[data-testid="stSidebar"]')
                times, seen = {}, {}
                for label, action, before in steps:
                    opened = time.perf_counter()
                    if before is not None:
                        before(page)
                    opened = time.perf_counter() - opened
                    times[label] = page.timed(lambda a=action, pg=page: a(pg))
                    seen[label] = (page.last_run_s, page.bytes, page.last_busy_s, opened)
                    print(f"  rep {rep + 1}: {label}: {times[label]:.2f} s (run reported finished after "
                          f"{page.last_run_s:.2f} s; browser busy {page.last_busy_s:.2f} s; "
                          f"{page.bytes / 1e6:.2f} MB received)", flush=True)
                rounds.append(times)
                details.append(seen)
                page.page.close()
        browser.close()
    labels = [label for label, _, _ in steps]
    table = [{"interaction": label, "first_round_s": rounds[0][label],
              "median_s": statistics.median(r[label] for r in rounds), "max_s": max(r[label] for r in rounds),
              "finished_median_s": statistics.median(d[label][0] for d in details),
              "browser_busy_median_s": statistics.median(d[label][2] for d in details),
              "before_clock_median_s": statistics.median(d[label][3] for d in details),
              "received_mb": round(statistics.median(d[label][1] for d in details) / 1e6, 3)}
             for label in labels]
    return {"first_render_s": first, "first_render_median_s": statistics.median(first), "interactions": table,
            "floor_first_render_s": floor,
            "floor_first_render_median_s": {k: statistics.median(v) for k, v in floor.items()}}


@app.command("browser")
def browser_speed(
    root: Path = typer.Option(Path("traces/bench"), help="Where the benchmark traces are (made if missing)."),
    samples: int = typer.Option(1000, min=2, help="Samples in each of the two Compare traces."),
    long_tokens: int = typer.Option(2048, min=64, help="Tokens of the long trace."),
    reps: int = typer.Option(3, min=1, help="Rounds, each on a freshly started server."),
    chromium: str = typer.Option("/usr/bin/chromium", help="The Chromium executable."),
    out: Path = typer.Option(Path("experiments/results/bench_browser.json"), help="Write JSON here."),
) -> None:
    """Every interaction of the app in headless Chromium, timed (target <= 1 s; first render <= 3 s)."""
    import os

    from sinkscope.config import command_line

    traces = make_traces(root, samples, long_tokens)
    names = {k: str(p.relative_to(root)) for k, p in traces.items()}
    result = run_browser(root, names, reps, chromium)
    inter = result["interactions"]
    slow = [row for row in inter if row["median_s"] > 1.0]
    result.update(command=command_line(), date=time.strftime("%Y-%m-%d %H:%M"), reps=reps, cpus=os.cpu_count(),
                  traces=names, over_1s=len(slow), slowest_median_s=max(r["median_s"] for r in inter))
    print(f"\nfirst render: median {result['first_render_median_s']:.2f} s over {reps} fresh servers "
          f"(target <= 3 s)")
    for label, median in result["floor_first_render_median_s"].items():
        print(f"  a bare Streamlit page, {label}: {median:.2f} s")
    print(f"{'interaction':<60} {'median':>7} {'max':>7}  (round 1: cold caches)")
    for row in inter:
        mark = "  > 1 s" if row["median_s"] > 1.0 else ""
        opened = row["before_clock_median_s"]
        print(f"{row['interaction']:<60} {row['median_s']:7.2f} {row['max_s']:7.2f}  ({row['first_round_s']:.2f})"
              f"{mark}" + (f"  [opening the box and typing, before the clock: {opened:.2f} s]" if opened > 0.01
                           else ""))
    print(f"{len(slow)} of {len(inter)} interactions over 1 s (median)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
