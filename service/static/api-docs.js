// /docs: Swagger UI, loaded from a CDN by this script; where the CDN is out of reach (a
// network without internet, a firewall that drops the packets), a plain API reference built
// from /openapi.json instead. The reference is read-only: no "try it out".
"use strict";

(() => {
  const METHODS = ["get", "post", "put", "patch", "delete"];
  const SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/";
  const CDN_WAIT_MS = 4000; // then the reference shows, should the CDN answer late or never

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text; // never innerHTML: text from the spec
    if (className) node.className = className;
    return node;
  }

  function refName(ref) {
    return ref.slice(ref.lastIndexOf("/") + 1);
  }

  // One line for a schema: a link to a named one, else its type (items, choices, format).
  function schemaLabel(schema) {
    if (!schema) return el("span", "any");
    if (schema.$ref) {
      const link = el("a", refName(schema.$ref));
      link.href = `#schema-${refName(schema.$ref)}`;
      return link;
    }
    const choices = schema.anyOf || schema.oneOf;
    if (choices) {
      const span = el("span");
      choices.forEach((choice, i) => {
        if (i) span.append(" | ");
        span.append(schemaLabel(choice));
      });
      return span;
    }
    if (schema.type === "array") {
      const span = el("span", "array of ");
      span.append(schemaLabel(schema.items));
      return span;
    }
    let text = schema.type || "object";
    if (schema.format) text += ` (${schema.format})`;
    if (schema.enum) text += `: ${schema.enum.join(", ")}`;
    return el("span", text);
  }

  function table(headings, rows) {
    const node = el("table");
    const head = node.createTHead().insertRow();
    headings.forEach((h) => head.append(el("th", h)));
    const body = node.createTBody();
    rows.forEach((cells) => {
      const row = body.insertRow();
      cells.forEach((cell) => {
        const td = row.insertCell();
        td.append(cell instanceof Node ? cell : String(cell ?? ""));
      });
    });
    return node;
  }

  function operation(path, method, op) {
    const section = el("section", undefined, "operation");
    section.append(el("h3", `${method.toUpperCase()} ${path}`));
    if (op.summary) section.append(el("p", op.summary));
    if (op.description) section.append(el("p", op.description, "description"));
    if (op.parameters?.length) {
      section.append(el("h4", "Parameters"));
      section.append(
        table(
          ["name", "in", "required", "type", "description"],
          op.parameters.map((p) => [
            p.name, p.in, p.required ? "yes" : "", schemaLabel(p.schema), p.description,
          ]),
        ),
      );
    }
    const content = op.requestBody?.content;
    if (content) {
      section.append(el("h4", "Request body"));
      section.append(
        table(
          ["content type", "schema"],
          Object.entries(content).map(([type, media]) => [type, schemaLabel(media.schema)]),
        ),
      );
    }
    if (op.responses) {
      section.append(el("h4", "Responses"));
      section.append(
        table(
          ["status", "description", "schema"],
          Object.entries(op.responses).map(([status, answer]) => {
            const media = Object.values(answer.content || {})[0];
            return [status, answer.description, media ? schemaLabel(media.schema) : ""];
          }),
        ),
      );
    }
    return section;
  }

  function schemaSection(name, schema) {
    const section = el("section", undefined, "schema");
    section.id = `schema-${name}`;
    section.append(el("h3", name));
    if (schema.description) section.append(el("p", schema.description, "description"));
    const required = new Set(schema.required || []);
    const properties = Object.entries(schema.properties || {});
    if (properties.length) {
      section.append(
        table(
          ["field", "required", "type", "description"],
          properties.map(([field, prop]) => [
            field, required.has(field) ? "yes" : "", schemaLabel(prop), prop.description,
          ]),
        ),
      );
    }
    return section;
  }

  function render(spec) {
    const root = el("main", undefined, "api-reference");
    const info = spec.info || {};
    root.append(el("h1", `${info.title || "API"} ${info.version || ""}`.trim()));
    if (info.summary) root.append(el("p", info.summary));
    const note = el("p", "Swagger UI could not be loaded (it comes from a CDN); this is the ");
    const raw = el("a", "OpenAPI document");
    raw.href = "openapi.json";
    note.append(raw, " as a plain reference.");
    note.className = "note";
    root.append(note);
    root.append(el("h2", "Endpoints"));
    for (const [path, item] of Object.entries(spec.paths || {})) {
      for (const method of METHODS) {
        if (item[method]) root.append(operation(path, method, item[method]));
      }
    }
    const schemas = Object.entries(spec.components?.schemas || {});
    if (schemas.length) {
      root.append(el("h2", "Schemas"));
      schemas.forEach(([name, schema]) => root.append(schemaSection(name, schema)));
    }
    return root;
  }

  const STYLE = `
    .api-reference { font: 15px/1.5 system-ui, sans-serif; max-width: 960px; margin: 2em auto;
      padding: 0 1em; color: #1d1d1f; }
    .api-reference h3 { font-family: ui-monospace, monospace; margin: 1.6em 0 0.3em; }
    .api-reference table { border-collapse: collapse; width: 100%; margin: 0.4em 0; }
    .api-reference th, .api-reference td { border: 1px solid #ddd; padding: 0.3em 0.5em;
      text-align: left; vertical-align: top; }
    .api-reference .description { white-space: pre-line; color: #444; }
    .api-reference .note { background: #fff6dd; padding: 0.5em 0.8em; border-radius: 4px; }
  `;

  let shown = false;

  async function showReference() {
    if (shown || window.SwaggerUIBundle) return;
    shown = true;
    document.head.append(el("style", STYLE));
    const target = document.getElementById("swagger-ui");
    try {
      const answer = await fetch("openapi.json");
      if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
      const spec = await answer.json();
      if (!window.SwaggerUIBundle) target.replaceChildren(render(spec)); // unless it came meanwhile
    } catch (error) {
      if (!window.SwaggerUIBundle) {
        target.replaceChildren(el("p", `Could not load the OpenAPI document: ${error.message}`));
      }
    }
  }

  function showSwaggerUI() {
    const target = document.getElementById("swagger-ui");
    target.replaceChildren(); // the reference, where it came first
    window.SwaggerUIBundle({
      url: "openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      layout: "BaseLayout",
      presets: [window.SwaggerUIBundle.presets.apis, window.SwaggerUIBundle.SwaggerUIStandalonePreset],
    });
  }

  // Added by script, the CDN's files never hold the page: neither its parsing nor its load.
  const css = document.createElement("link");
  css.rel = "stylesheet";
  css.href = `${SWAGGER_UI}swagger-ui.css`;
  document.head.append(css);
  const bundle = document.createElement("script");
  bundle.src = `${SWAGGER_UI}swagger-ui-bundle.js`;
  bundle.onload = showSwaggerUI;
  bundle.onerror = showReference;
  document.head.append(bundle);
  setTimeout(showReference, CDN_WAIT_MS);
})();
