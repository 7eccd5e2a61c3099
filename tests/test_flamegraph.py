"""The flame graph: a self-contained HTML page, from the API and the command
line, rendered by a real headless browser (Debian's chromium)."""

from __future__ import annotations

import contextvars
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

import memlimits_async as ml
from helpers import run_python

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium): "
    "the flame graph cannot be rendered in a real browser here",
)


def build_rows(held: list[object], n: int) -> None:
    for _ in range(n):
        held.append(bytes(1000))  # rows


def render_page(held: list[object]) -> None:
    held.append("x" * 600_000)  # page
    build_rows(held, 1000)


def handler(held: list[object]) -> None:
    render_page(held)
    build_rows(held, 300)


@pytest.fixture
def snapshot(exact_accounting: None) -> ml.Snapshot:
    held: list[object] = []

    def run() -> ml.LimitScope:
        with ml.limit_scope() as scope:
            handler(held)
        return scope

    scope = contextvars.Context().run(run)
    return scope.snapshot()


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # tests may run as root
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--window-size=1200,400",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=180,
            # Under tools/check-native.sh the sanitizer runtime is preloaded
            # for Python; the browser is not what it checks.
            env={
                name: value
                for name, value in os.environ.items()
                if name != "LD_PRELOAD" and not name.endswith("SAN_OPTIONS")
            },
        )


def test_page_is_self_contained(snapshot: ml.Snapshot, tmp_path: Path) -> None:
    path = tmp_path / "live.html"
    snapshot.flamegraph(path)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # Nothing to fetch: no external script, style, font or image.
    assert not re.search(r"""\b(src|href)\s*=""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', page)
    assert data is not None
    nodes = json.loads(data.group(1))
    assert nodes[0]["v"] == snapshot.total("live") and nodes[0]["u"] == -1
    # Parents come first; a parent holds what its children hold.
    children: dict[int, int] = {}
    for index, node in enumerate(nodes[1:], 1):
        assert 0 <= node["u"] < index
        children[node["u"]] = children.get(node["u"], 0) + node["v"]
    assert all(nodes[u]["v"] >= total for u, total in children.items())
    assert {"handler", "render_page", "build_rows"} <= {n["n"] for n in nodes}


def deep(depth: int, held: list[object]) -> None:
    if depth:
        deep(depth - 1, held)
    else:
        held.append(bytes(100_000))


def test_stacks_as_deep_as_the_limit_allows(
    exact_accounting: None, tmp_path: Path
) -> None:
    # 1000 frames: deeper than Python's recursion limit would let a
    # recursive walk, or json's encoder, nest.
    held: list[object] = []
    ml.configure(traceback_limit=1000)
    try:

        def run() -> ml.LimitScope:
            with ml.limit_scope() as scope:
                deep(sys.getrecursionlimit() - 60, held)
            return scope

        scope = contextvars.Context().run(run)
    finally:
        ml.configure(traceback_limit=16)
    snapshot = scope.snapshot()
    assert max(len(t.traceback) for t in snapshot.traces) > 900
    snapshot.flamegraph(tmp_path / "deep.html")
    assert "deep" in (tmp_path / "deep.html").read_text()


def test_allocated_and_title(snapshot: ml.Snapshot, tmp_path: Path) -> None:
    path = tmp_path / "allocated.html"
    snapshot.flamegraph(path, "allocated", title="a <b>report</b>")
    page = path.read_text()
    assert "<title>a &lt;b&gt;report&lt;/b&gt;</title>" in page
    assert "allocated bytes" in page



def test_flamegraph_html_is_the_page_flamegraph_writes(
    snapshot: ml.Snapshot, tmp_path: Path
) -> None:
    path = tmp_path / "page.html"
    snapshot.flamegraph(path, "allocated", title="t")
    assert snapshot.flamegraph_html("allocated", title="t") == path.read_text()
    with pytest.raises(ValueError, match="measure"):
        snapshot.flamegraph_html("peak")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="title"):
        snapshot.flamegraph_html(title=3)  # type: ignore[arg-type]

def test_data_cannot_close_the_script(tmp_path: Path) -> None:
    frame = ml.Frame("</script><script>alert(1)</script>.py", 1, "f")
    trace = ml.Trace(ml.Traceback([frame]), 100, 1, 0.0, 100, 1, 0.0)
    ml.Snapshot([trace], 16, 1).flamegraph(tmp_path / "x.html")
    page = (tmp_path / "x.html").read_text()
    assert page.count("</script>") == 2  # the page's own two


def test_flamegraph_rejects_bad_input(snapshot: ml.Snapshot) -> None:
    with pytest.raises(TypeError, match="path"):
        snapshot.flamegraph(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="measure"):
        snapshot.flamegraph("x.html", "peak")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="measure"):
        snapshot.flamegraph("x.html", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="title"):
        snapshot.flamegraph("x.html", title=3)  # type: ignore[arg-type]


def test_command_line(snapshot: ml.Snapshot, tmp_path: Path) -> None:
    dumped = tmp_path / "snap.json"
    snapshot.dump(dumped)
    result = run_python("-m", "memlimits_async", "flamegraph", str(dumped))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "snap.html")
    assert "render_page" in (tmp_path / "snap.html").read_text()
    out = tmp_path / "alloc.html"
    result = run_python(
        "-m",
        "memlimits_async",
        "flamegraph",
        str(dumped),
        "-o",
        str(out),
        "--measure",
        "allocated",
        "--title",
        "T",
    )
    assert result.returncode == 0, result.stderr
    assert "<title>T</title>" in out.read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("not json", "not a snapshot"),
        ('{"format": "other"}', "not a snapshot"),
        ('{"format": "memlimits_async.Snapshot/1"}', "damaged snapshot"),
        (b"\xff\xfe\x00binary", "cannot read"),
    ],
)
def test_command_line_bad_input(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "input.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    result = run_python("-m", "memlimits_async", "flamegraph", str(path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "input.html").exists()


def test_command_line_usage_errors(tmp_path: Path) -> None:
    for args in (
        (),
        ("nosuchcommand",),
        ("flamegraph",),
        ("flamegraph", "x.json", "--measure", "peak"),
    ):
        result = run_python("-m", "memlimits_async", *args)
        assert result.returncode == 2, args
        assert "usage:" in result.stderr and "Traceback" not in result.stderr
    # Never over the snapshot itself.
    dumped = tmp_path / "snap.json"
    ml.Snapshot([], 16, 1).dump(dumped)
    result = run_python(
        "-m", "memlimits_async", "flamegraph", str(dumped), "-o", str(dumped)
    )
    assert result.returncode == 2 and "overwrite" in result.stderr
    assert ml.Snapshot.load(dumped).traces == ()


# ---- in a real browser ----

# Appended to the page: hover over build_rows, click it (zoom in), and read
# what the script drew, as the browser's final DOM shows it.
POKE = """<script>
(function () {
  var g = document.querySelector('g.frame[data-name="build_rows"]');
  g.dispatchEvent(new MouseEvent("mouseenter"));
  g.dispatchEvent(new MouseEvent("click", {bubbles: true}));
  var widths = [];
  document.querySelectorAll('g.frame[data-name="build_rows"] rect').forEach(
    function (r) { widths.push(r.getAttribute("width")); });
  document.body.setAttribute("data-zoomed-widths", widths.join(","));
  document.body.setAttribute("data-svg-width",
    document.getElementById("graph").clientWidth);
})();
</script></body>"""


@needs_chromium
def test_renders_in_headless_chromium(snapshot: ml.Snapshot, tmp_path: Path) -> None:
    path = tmp_path / "live.html"
    snapshot.flamegraph(path)
    result = _chromium("--dump-dom", path.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # The boxes exist only if the script ran: the page ships none.
    assert "<g " not in path.read_text()
    boxes = re.findall(r'<g class="frame" data-name="([^"]*)"', dom)
    assert {"all", "handler", "render_page", "build_rows"} <= set(boxes)
    texts = re.findall(r"<text [^>]*>([^<]*)</text>", dom)
    # Function, bytes, share and file:line are written in the boxes.
    assert any(
        t.startswith("render_page ") and "%)" in t and "test_flamegraph.py:" in t
        for t in texts
    ), texts
    assert any(re.search(r"\d (KiB|MiB) \(\d+\.\d%\)", t) for t in texts), texts


@needs_chromium
def test_hover_and_click_zoom_in_headless_chromium(
    snapshot: ml.Snapshot, tmp_path: Path
) -> None:
    path = tmp_path / "poked.html"
    snapshot.flamegraph(path)
    path.write_text(path.read_text().replace("</body>", POKE))
    result = _chromium("--dump-dom", path.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # The hover wrote the box's details into the info line.
    info = re.search(r'<div id="info">(.*?)</div>', dom, re.S)
    assert info is not None
    assert "build_rows" in info.group(1) and "of zoomed" in info.group(1)
    assert "samples" in info.group(1)
    # Zoomed: the clicked box (the deeper of the two build_rows calls)
    # spans the whole width.
    widths = re.search(r'data-zoomed-widths="([^"]*)"', dom)
    svg_width = re.search(r'data-svg-width="([^"]*)"', dom)
    assert widths is not None and svg_width is not None
    assert float(svg_width.group(1)) > 500
    assert float(widths.group(1).split(",")[0]) == pytest.approx(
        float(svg_width.group(1))
    )


def _png_rows(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the (still filtered) pixel rows of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@needs_chromium
def test_screenshot_is_not_blank(snapshot: ml.Snapshot, tmp_path: Path) -> None:
    path = tmp_path / "live.html"
    snapshot.flamegraph(path)
    shot = tmp_path / "shot.png"
    result = _chromium(f"--screenshot={shot}", path.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    width, height, raw = _png_rows(shot.read_bytes())
    assert (width, height) == (1200, 400)
    # A blank page is one colour: its filtered rows hold a handful of
    # distinct bytes.  Coloured boxes and text give hundreds.
    assert len(set(raw)) > 64
