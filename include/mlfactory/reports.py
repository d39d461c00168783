"""What every HTML page the pipeline writes to the bucket shares: one Content-Security-Policy that lets no
script run and no request leave the page (should a value from the data ever reach a page unescaped, it stays
text), and its styles inline. Great Expectations' Data Docs pages are rewritten to the same shape: GX loads
jQuery, Bootstrap and Vega from CDNs (pages read from a bucket, often offline, then fetch from third parties), and
its templates do not escape what they are given."""

from __future__ import annotations

import html
import re

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def head(title: str, style: str = "") -> str:
    """The start of a page, to its ``<body>``: charset, the CSP (first: it holds for all that follows), title, style."""
    return (f'<!doctype html><html><head><meta charset="utf-8">\n<meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}">\n<title>{html.escape(title)}</title>\n<style>{style}</style></head>')


def escaped(value):
    """Every string in ``value`` (dicts, lists, tuples, sets: keys too) HTML-escaped, for a renderer that does not."""
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, dict):
        return {escaped(k): escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return type(value)(escaped(v) for v in value)
    return value


_SCRIPT = re.compile(r"<script\b.*?</script\s*>", re.I | re.S)
_FETCHES = re.compile(r"<link\b[^>]*>|<img\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.I)
_TAG = re.compile(r"<[a-zA-Z][^>]*>")  # (text from the data is escaped: it holds no "<")
_HANDLER = re.compile(r"""\s+on[a-z]+\s*=\s*(?:"[^"]*"|'[^']*'|[^\s>]+)""", re.I)  # onclick=... (GX's buttons)
_STYLE = ("body{font-family:sans-serif;margin:1em 2em;color:#222} table{border-collapse:collapse;margin:.5em 0}"
          " td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top} .badge{padding:0 4px}"
          " .text-danger{color:#b00} .text-success{color:#080} .collapse{display:block} nav,footer{display:none}")
_HEAD = re.compile(r"<head\b[^>]*>", re.I)


def data_docs(page: str) -> str:
    """A GX Data Docs page with no script or inline handler, nothing fetched from elsewhere (GX's CDN stylesheets
    and scripts, its logo), a small stylesheet inline and the CSP first in its head. (Bootstrap's collapsed sections,
    without Bootstrap, show open.)"""
    page = _TAG.sub(lambda tag: _HANDLER.sub("", tag.group()), _FETCHES.sub("", _SCRIPT.sub("", page)))
    meta = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n<style>{_STYLE}</style>'
    match = _HEAD.search(page)
    return page[:match.end()] + meta + page[match.end():] if match else head("Data Docs", _STYLE) + page
