"""The playground page's files (scheduler/http/static/): self-contained (no outside URL, no inline
script or style, only files that exist), every element the script looks up exists in the page, and
the Content-Security-Policy allows nothing beyond this origin and the blob: results. The page in a
real browser: tests/service/test_playground.py."""

from __future__ import annotations

import re

from diffserve.scheduler.http import playground


def files() -> dict[str, str]:
    return {name: body.decode() for name, (body, _) in playground.static_files().items()}


def test_the_page_and_its_files_are_served():
    assert {"playground.html", "playground.js", "playground.css", "favicon.svg"} <= set(files())
    media = {name: media_type for name, (_, media_type) in playground.static_files().items()}
    assert media["playground.js"].startswith("text/javascript") and media["playground.html"].startswith("text/html")


def test_the_page_refers_only_to_its_own_files():
    page = files()["playground.html"]
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs, "the page loads its script and style"
    for ref in refs:
        assert ref.startswith("/static/") and ref.removeprefix("/static/") in files(), ref
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script"
    assert "<style" not in page and " style=" not in page, "inline style"
    assert not re.search(r"<[^>]+\son[a-z]+=", page), "inline event handler"
    for name, text in files().items():
        assert "://" not in text.replace("http://www.w3.org/2000/svg", ""), f"{name} names an outside URL"
    assert "eval(" not in files()["playground.js"] and "innerHTML" not in files()["playground.js"]


def test_every_element_the_script_uses_exists():
    ids = set(re.findall(r'\bid="([^"]+)"', files()["playground.html"]))
    used = set(re.findall(r'\$\("([^"]+)"\)', files()["playground.js"]))
    assert used and used <= ids, sorted(used - ids)


def test_csp_is_strict():
    directives = dict(d.split(" ", 1) for d in playground.CSP.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'" and directives["connect-src"] == "'self'"
    assert all("unsafe" not in v and "*" not in v and "http" not in v and "data:" not in v for v in directives.values())
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
