"""The HTML of GET /docs: one self-contained page that fetches /openapi.json and renders it.

No CDN and no framework (nothing outside the cluster may be reachable): a few lines of plain
JavaScript list every operation with its parameters, request body, responses and schemas. The
page fetches the document without a token (it holds none, and asks for none), so it renders the
public document, without the served products' feature specs, unless SIRA_OPENAPI_FEATURE_SPECS
is on (app/http/openapi.py).
"""

from __future__ import annotations

DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SIRA API</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
  h1 { margin-bottom: 0; } .version { color: #666; }
  details.op { border: 1px solid #ccc; border-radius: 6px; margin: .6rem 0; }
  details.op > summary { padding: .5rem .8rem; cursor: pointer; }
  details.op > div { padding: 0 .8rem .8rem; }
  .method { display: inline-block; min-width: 4.5rem; font-weight: 700; text-transform: uppercase; }
  .get { color: #0a6; } .post { color: #06c; } .public { color: #888; font-size: .85em; }
  code, pre { font: 13px/1.4 ui-monospace, monospace; } pre { background: #f6f6f6; padding: .6rem; overflow: auto; }
  table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; }
</style>
</head>
<body>
<h1>SIRA API</h1>
<p class="version" id="version">loading <a href="/openapi.json">/openapi.json</a>...</p>
<p id="description"></p>
<div id="operations"></div>
<h2>Schemas</h2>
<div id="schemas"></div>
<script>
"use strict";
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}
function json(value) { return el("pre", {}, JSON.stringify(value, null, 2)); }
function operation(path, method, op, doc) {
  const isPublic = Array.isArray(op.security) && op.security.length === 0;
  const head = el("summary", {}, el("span", {class: "method " + method}, method), el("code", {}, path),
                  " \\u2014 " + (op.summary || ""), isPublic ? el("span", {class: "public"}, " (public)") : "");
  const body = el("div", {});
  if (op.description) body.append(el("p", {}, op.description));
  if (op.parameters && op.parameters.length) {
    const rows = op.parameters.map(p => el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
      el("td", {}, p.required ? "required" : "optional"), el("td", {}, JSON.stringify(p.schema))));
    body.append(el("h4", {}, "Parameters"), el("table", {}, ...rows));
  }
  if (op.requestBody) {
    body.append(el("h4", {}, "Request body"));
    for (const [type, media] of Object.entries(op.requestBody.content))
      body.append(el("p", {}, type), json(media.schema));
  }
  body.append(el("h4", {}, "Responses"));
  const rows = Object.entries(op.responses).map(([status, r]) => el("tr", {}, el("td", {}, status),
    el("td", {}, r.description || ""),
    el("td", {}, Object.entries(r.content || {}).map(([t, m]) => t + " " + JSON.stringify(m.schema)).join("; "))));
  body.append(el("table", {}, ...rows));
  return el("details", {class: "op"}, head, body);
}
fetch("/openapi.json").then(r => r.json()).then(doc => {
  document.getElementById("version").textContent = "version " + doc.info.version + " \\u00b7 OpenAPI " + doc.openapi;
  document.getElementById("description").textContent = doc.info.description || "";
  const ops = document.getElementById("operations");
  for (const [path, item] of Object.entries(doc.paths))
    for (const [method, op] of Object.entries(item)) ops.append(operation(path, method, op, doc));
  const schemas = document.getElementById("schemas");
  for (const [name, schema] of Object.entries(doc.components.schemas))
    schemas.append(el("details", {class: "op"}, el("summary", {}, el("code", {}, name)), el("div", {}, json(schema))));
}).catch(err => { document.getElementById("version").textContent = "cannot load /openapi.json: " + err; });
</script>
</body>
</html>
"""
