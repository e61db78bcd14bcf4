"""The API reference page (`/docs`): the service's OpenAPI description rendered on the server as one self-contained
HTML page. FastAPI's own pages load Swagger UI or ReDoc from a CDN, which a server without internet access (or a
browser that blocks third-party scripts) cannot show; this page needs nothing beyond the server."""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
         "h2{font-family:monospace;border-top:1px solid #ccc;padding-top:1em}"
         ".method{display:inline-block;min-width:4.5em}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}")


def api_reference_html(schema: dict[str, Any]) -> str:
    """An HTML page listing every operation of the OpenAPI `schema`: method and path, summary, description, parameters
    and responses, with a link to the machine-readable schema (`/openapi.json`)."""
    info = schema.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)} API</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{escape(title)} API</h1>",
             _paragraphs(info.get("description", "")),
             "<p>The machine-readable description: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI "
             f"{escape(str(schema.get('openapi', '')))}).</p>"]
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            parts.append(_operation_html(method, path, operation))
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation_html(method: str, path: str, operation: dict[str, Any]) -> str:
    html = [f"<h2><span class=method>{escape(method.upper())}</span> {escape(path)}</h2>",
            f"<p><strong>{escape(operation.get('summary', ''))}</strong></p>"]
    if operation.get("description"):
        html.append(_paragraphs(operation["description"]))
    parameters = operation.get("parameters", [])
    if parameters:
        html.append("<table><tr><th>parameter</th><th>in</th><th>required</th><th>description</th></tr>")
        html += [f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p.get('in', ''))}</td>"
                 f"<td>{'yes' if p.get('required') else 'no'}</td><td>{escape(p.get('description', ''))}</td></tr>"
                 for p in parameters]
        html.append("</table>")
    responses = operation.get("responses", {})
    if responses:
        html.append("<p>Responses: " + ", ".join(
            f"<code>{escape(code)}</code> {escape(answer.get('description', ''))}"
            for code, answer in responses.items()) + "</p>")
    return "\n".join(html)


def _paragraphs(text: str) -> str:
    """Text as HTML paragraphs: a blank line ends one; single line breaks (the source's wrapping) become spaces."""
    return "\n".join(f"<p>{escape(' '.join(block.split()))}</p>" for block in text.split("\n\n") if block.strip())
