// The status page: fetches the watcher's snapshot every second and redraws. Text only ever
// goes in through textContent, never as HTML: project paths and commands come from users.
"use strict";

const projectId = (() => {
  const match = location.pathname.match(/^\/project\/(.+)$/);
  return match ? decodeURIComponent(match[1]) : null;
})();

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  let value = Number(bytes);
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (value < 1024 || unit === "TiB") return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return "";
}

function when(seconds) {
  if (!seconds) return "";
  const date = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function who(person) {
  return person ? `${person.user}@${person.host}` : "";
}

function doing(writer) {
  if (!writer) return "";
  const parts = [who(writer)];
  if (writer.job) parts.push(`job ${writer.job}`);
  if (writer.command) parts.push(writer.command.split(" ")[0].split("/").pop());
  return parts.join(", ");
}

function stateBadge(state) {
  return el("span", state, `state state-${state}`);
}

function card(label, value, alarm) {
  const node = el("div", null, alarm ? "card alarm" : "card");
  node.dataset.card = label;
  node.append(el("div", value, "value"), el("div", label, "label"));
  return node;
}

function drawSummary(summary) {
  const box = document.getElementById("summary");
  box.replaceChildren(
    card("projects", summary.projects),
    card("held", summary.held),
    card("orphaned", summary.orphaned, summary.orphaned > 0),
    card("lock-delay", summary["lock-delay"]),
    card("waiting", summary.waiting),
    card("hosts alive", summary.hosts_alive),
    card("stranded", size(summary.stranded_bytes), summary.stranded_bytes > 0),
    card("unflushed", size(summary.unflushed_bytes)),
  );
}

function projectCell(row) {
  const cell = el("td");
  const link = el("a", row.path || row.project);
  link.href = `/project/${encodeURIComponent(row.project)}`;
  cell.append(link, el("div", row.project, "id"));
  return cell;
}

function drawProjects(rows) {
  const body = document.querySelector("#projects tbody");
  body.replaceChildren(...rows.map((row) => {
    const tr = el("tr", null, "link");
    tr.dataset.project = row.project;
    tr.dataset.state = row.state;
    const writer = row.writer;
    const held = row.state === "held";
    const extras = [];
    if (row.served) extras.push(`workers at ${row.served}`);
    if (row.deployed) extras.push(`deployed on ${row.deployed.host}`);
    const flush = row.last_flush;
    tr.append(
      projectCell(row),
      el("td").appendChild(stateBadge(row.state)).parentNode,
      el("td", writer ? (held ? doing(writer) : `was ${doing(writer)}`) : ""),
      el("td", writer ? when(writer.since) : ""),
      el("td", row.token),
      el("td", held && writer ? `${writer.ttl_left.toFixed(1)} s` : (row.free_in ? `free in ${row.free_in.toFixed(1)} s` : "")),
      el("td", writer ? size(writer.unflushed) : ""),
      el("td", row.queue.map((w) => who(w) + (w.takeover ? " (takeover)" : "")).join(", ")),
      el("td", row.readers.map(who).join(", ")),
      el("td", flush ? `${when(flush.at)}, ${size(flush.bytes)}` : ""),
      el("td", extras.join("; ")),
    );
    tr.addEventListener("click", (event) => {
      if (event.target.tagName !== "A") location.href = `/project/${encodeURIComponent(row.project)}`;
    });
    return tr;
  }));
  document.getElementById("empty").hidden = rows.length > 0;
}

function detail(list, term, value) {
  if (value === null || value === undefined || value === "") return;
  const dt = el("dt", term);
  const dd = el("dd");
  if (value instanceof Node) dd.append(value); else dd.textContent = String(value);
  dd.dataset.detail = term;
  list.append(dt, dd);
}

function drawProject(row) {
  document.getElementById("title").textContent = row.path || row.project;
  const list = document.getElementById("details");
  list.replaceChildren();
  const writer = row.writer;
  detail(list, "project", row.project);
  detail(list, "path", row.path);
  detail(list, "state", stateBadge(row.state));
  if (writer) {
    detail(list, row.state === "held" ? "writer" : "former writer", doing(writer));
    detail(list, "since", when(writer.since));
    detail(list, "token", writer.token);
    if (row.state === "held") detail(list, "TTL left", `${writer.ttl_left.toFixed(1)} s`);
    detail(list, "unflushed", size(writer.unflushed));
    if (row.state === "orphaned") {
      detail(list, "stranded", `${size(writer.unflushed) || "an unknown amount"} on ${writer.host}: ` +
        "wait for that host, or `dbguard break PROJECT --force` and `dbguard recover` there");
    }
  }
  detail(list, "free in", row.free_in ? `${row.free_in.toFixed(1)} s` : null);
  detail(list, "queue", row.queue.map(who).join(", ") || "nobody");
  detail(list, "readers", row.readers.map(who).join(", ") || "none");
  detail(list, "workers", row.served);
  detail(list, "deployed", row.deployed ? `on ${row.deployed.host} since ${when(row.deployed.since)}` : null);
  if (row.last_loss) detail(list, "last loss", `${row.last_loss.reason} at ${when(row.last_loss.at)}`);
  const body = document.querySelector("#history tbody");
  body.replaceChildren(...row.history.slice().reverse().map((event) => {
    const tr = el("tr");
    tr.dataset.event = event.event;
    const details = [];
    if (event.by) details.push(`by ${event.by}`);
    if (event.takeover) details.push("takeover");
    if (event.job) details.push(`job ${event.job}`);
    if (event.unflushed) details.push(`${size(event.unflushed)} unflushed`);
    if (event.records !== undefined) details.push(`${event.records} records`);
    if (event.bytes !== undefined) details.push(size(event.bytes));
    if (event.seconds !== undefined) details.push(`${Number(event.seconds).toFixed(2)} s`);
    if (event.detail) details.push(event.detail);
    tr.append(el("td", when(event.at)), el("td", event.event), el("td", who(event)), el("td", event.token),
      el("td", details.join(", ")));
    return tr;
  }));
}

async function refresh() {
  const url = projectId ? `/api/project/${encodeURIComponent(projectId)}` : "/api/site";
  const error = document.getElementById("error");
  try {
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`${response.status}: ${(await response.text()).trim()}`);
    const data = await response.json();
    if (data.error) {
      error.textContent = `The lease service does not answer: ${data.error}`;
      error.hidden = false;
    } else {
      error.hidden = true;
    }
    if (data.service) {
      document.getElementById("service").textContent =
        `${data.service.backend} ${data.service.address || ""}, TTL ${data.service.ttl} s`;
    }
    if (projectId) {
      document.getElementById("site-view").hidden = true;
      document.getElementById("project-view").hidden = false;
      drawProject(data);
    } else if (data.summary) {
      drawSummary(data.summary);
      drawProjects(data.projects);
    }
    document.getElementById("updated").textContent = data.generated ? `Updated ${when(data.generated)}.` : "";
    document.body.dataset.generated = String(data.generated || "");
  } catch (failure) {
    error.textContent = `Cannot update: ${failure.message}`;
    error.hidden = false;
  }
}

refresh();
setInterval(refresh, 1000);
