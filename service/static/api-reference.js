// A plain API reference built from /openapi.json, for /docs where Swagger UI (loaded from a
// CDN) is not there: a server or browser without internet. Read-only: no "try it out".
"use strict";

(() => {
  const METHODS = ["get", "post", "put", "patch", "delete"];

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

  async function fallBack() {
    if (window.SwaggerUIBundle) return; // the CDN answered: Swagger UI is on the page
    const style = el("style", STYLE);
    document.head.append(style);
    const target = document.getElementById("swagger-ui") || document.body;
    try {
      const answer = await fetch("openapi.json");
      if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
      target.replaceChildren(render(await answer.json()));
    } catch (error) {
      target.replaceChildren(el("p", `Could not load the OpenAPI document: ${error.message}`));
    }
  }

  window.addEventListener("load", fallBack);
})();
