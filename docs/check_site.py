"""Checks the built documentation site as a reader sees it, in headless Chromium.

Builds the site (or takes `--site`), serves it on 127.0.0.1, and then:

1. follows every internal link from every page and fails on any that does not load;
2. checks that the navigation tabs of `mkdocs.yml` are on the home page;
3. loads the home page and an API page in headless Chromium, lets the JavaScript run,
   and counts what MathJax typeset and which code blocks are highlighted;
4. saves screenshots of both pages (light and dark scheme) for a person to look at.

MathJax ships with the docs (`docs/javascripts/mathjax/`), so the check needs no
internet access.

Run from the repository root:

    python docs/check_site.py --out site-check

Exits 0 with a message when no Chromium is installed (Debian: `apt-get install
chromium`), so CI may run it unconditionally.
"""

import argparse
import functools
import html.parser
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request


ROOT = pathlib.Path(__file__).resolve().parent.parent
# Each page with the height of its screenshot: the API page's maths (in the docstring
# of `filter_value_and_dodge`) sits below the first screenful. Scrolling to an anchor
# instead leaves headless Chromium's capture half blank.
PAGES = {"home": ("/", 1600), "api": ("/api/filter_dodge/", 3600)}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    candidates = [os.environ.get("CHROMIUM", "")] + list(CHROMIUM_NAMES)
    for name in candidates:
        if name and (path := shutil.which(name)):
            return path
    return None


def build_site(destination: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q"]
        + ["--site-dir", str(destination)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the built site, quietly."""

    def __init__(self, *args, site: pathlib.Path, **kw):
        super().__init__(*args, directory=str(site), **kw)

    def log_message(self, format, *args):
        pass


class LinkParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value and (tag, name) in {
                ("a", "href"),
                ("link", "href"),
                ("script", "src"),
                ("img", "src"),
            }:
                self.links.append(value)


def check_links(base: str) -> tuple[int, list[str]]:
    """Crawls every page reachable from the home page; returns (pages, broken)."""
    seen, broken, queue, pages = set(), [], [base + "/"], 0
    while queue:
        url = queue.pop()
        if url in seen:
            continue
        seen.add(url)
        try:
            with urllib.request.urlopen(url) as response:
                body = response.read()
                content_type = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            broken.append(f"{url} ({error.code})")
            continue
        if "text/html" not in content_type:
            continue
        pages += 1
        parser = LinkParser()
        parser.feed(body.decode())
        for link in parser.links:
            target = urllib.parse.urldefrag(urllib.parse.urljoin(url, link)).url
            if target.startswith(base) and target not in seen:
                queue.append(target)
    return pages, broken


def chromium(binary: str, profile: str, url: str, *flags: str) -> str:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        # Lets MathJax and the theme's scripts finish before the dump or screenshot.
        "--virtual-time-budget=15000",
        *flags,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def inspect(dom: str) -> dict[str, int]:
    """What a reader sees, counted in the DOM after the scripts have run."""
    return {
        "maths typeset by MathJax": dom.count("<mjx-container"),
        # MathJax's CHTML output draws each glyph with a CSS rule; without the rules
        # the typeset maths takes its space on the page but is invisible.
        "maths glyph styles": len(re.findall(r"mjx-c\.mjx-c[0-9A-F]+", dom)),
        "maths left as TeX": len(
            re.findall(r'class="arithmatex">\\\(|class="arithmatex">\\\[', dom)
        ),
        "highlighted code blocks": len(re.findall(r'<div class="[^"]*highlight', dom)),
        "coloured code tokens": len(
            re.findall(r'<span class="(?:k|kn|n|nf|s2|mi|mf|o|p)">', dom)
        ),
        "navigation tabs": dom.count('class="md-tabs__link'),
    }


def check_page(
    binary: str,
    scratch: str,
    base: str,
    name: str,
    path: str,
    height: int,
    out: pathlib.Path,
) -> list[str]:
    """Inspects one page after its scripts ran and screenshots it in both schemes."""
    window = f"--window-size=1280,{height}"
    dom = chromium(
        binary, tempfile.mkdtemp(dir=scratch), base + path, window, "--dump-dom"
    )
    counts = inspect(dom)
    print(f"{name} ({path}): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    failures = []
    if counts["navigation tabs"] < 2:
        failures.append(f"{name}: navigation tabs missing")
    if counts["highlighted code blocks"] == 0 or counts["coloured code tokens"] == 0:
        failures.append(f"{name}: no highlighted code")
    if counts["maths typeset by MathJax"] and not counts["maths glyph styles"]:
        failures.append(f"{name}: maths typeset but drawn invisible (no glyph CSS)")
    if counts["maths left as TeX"]:
        failures.append(f"{name}: {counts['maths left as TeX']} formulas not typeset")
    # `--force-dark-mode` makes the page see `prefers-color-scheme: dark`, which picks
    # the slate palette of mkdocs.yml.
    for scheme, flags in (("light", ()), ("dark", ("--force-dark-mode",))):
        screenshot = (out / f"{name}-{scheme}.png").resolve()
        profile = tempfile.mkdtemp(dir=scratch)
        chromium(
            binary, profile, base + path, window, f"--screenshot={screenshot}", *flags
        )
        print(f"  screenshot: {screenshot}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Checks the built documentation site in headless Chromium."
    )
    parser.add_argument(
        "--site", type=pathlib.Path, help="a built site (default: build one)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "site-check")
    args = parser.parse_args()

    binary = find_chromium()
    if binary is None:
        print(
            "check_site: no Chromium found (apt-get install chromium); nothing checked."
        )
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        site = args.site
        if site is None:
            site = pathlib.Path(scratch) / "site"
            build_site(site)
        handler = functools.partial(SiteHandler, site=site)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        failures = []
        try:
            pages, broken = check_links(base)
            print(f"links: {pages} pages crawled, {len(broken)} broken")
            failures += [f"broken link {link}" for link in broken]

            args.out.mkdir(parents=True, exist_ok=True)
            for name, (path, height) in PAGES.items():
                failures += check_page(
                    binary, scratch, base, name, path, height, args.out
                )
        finally:
            server.shutdown()
            server.server_close()

    for failure in failures:
        print(f"FAIL: {failure}")
    print("check_site: " + ("failed" if failures else "ok"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
