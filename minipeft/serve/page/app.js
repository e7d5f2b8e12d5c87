// The page of `minipeft serve`: it speaks only the server's own HTTP API (api.py), as any client could.
"use strict";

const $ = (id) => document.getElementById(id);
const TASK_NOTES = {  // what each task trains, and the prompt that shows it
  examples: ["The answers of your examples, in the model's chat template.", "chat", null],
  fox: ["One sentence by heart: \"A quick brown fox did not jump over the lazy dog...\"", "text", "A quick brown fox"],
  code: ["Python files of the server's standard library.", "text", "def fibonacci(n):"],
};
let defaultMethods = {};
let models = [];

// A server started with --api-key answers 401 without it: the page asks once, keeps it for this tab, and
// sends it as OpenAI's clients do (Authorization: Bearer KEY).
let keyDeclined = false;  // the user cancelled the question: the page does not ask again until reloaded

async function request(path, options = {}) {
  for (let asked = false; ; asked = true) {
    const key = sessionStorage.getItem("minipeft-api-key");
    const headers = {"Content-Type": "application/json", ...(key ? {Authorization: `Bearer ${key}`} : {})};
    const response = await fetch(path, {...options, headers});
    if (response.status !== 401 || asked || keyDeclined) return response;
    const given = window.prompt("This server needs its API key (minipeft serve --api-key):");
    if (given === null) {
      keyDeclined = true;
      return response;
    }
    sessionStorage.setItem("minipeft-api-key", given.trim());
  }
}

async function call(method, path, body) {
  const response = await request(path, {method, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

// --- the models: the bare base and every adapter ---------------------------------------------------------
async function refreshModels(select) {
  const checked = new Set([...document.querySelectorAll("#models input:checked")].map((box) => box.value));
  if (select) checked.add(select);
  models = (await call("GET", "/v1/models")).data;
  const list = $("models");
  list.replaceChildren();
  models.forEach((model, i) => {
    const item = document.createElement("li");
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = model.id;
    box.checked = checked.has(model.id) || (checked.size === 0 && i === 0);
    label.append(box, " " + (model.method ? model.id : model.id + " (bare base)"));
    item.append(label);
    if (model.method) {
      const method = document.createElement("span");
      method.className = "method";
      method.textContent = model.method.toLowerCase();
      const download = document.createElement("a");
      download.href = "#";  // fetched with the key, then saved
      download.onclick = (event) => {
        event.preventDefault();
        saveDownload(model.id).catch((e) => alert(e.message));
      };
      download.textContent = "download";
      download.title = "adapter_config.json and adapter_model.safetensors, as peft writes them";
      const remove = document.createElement("span");
      remove.className = "remove";
      remove.textContent = "remove";
      remove.onclick = () => call("DELETE", `/api/adapters/${encodeURIComponent(model.id)}`)
        .then(() => refreshModels()).catch((e) => alert(e.message));
      item.append(method, download, remove);
    }
    list.append(item);
  });
}

async function saveDownload(name) {
  const response = await request(`/api/adapters/${encodeURIComponent(name)}/download`);
  if (!response.ok) throw new Error((await response.json()).error.message);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${name}.zip`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

// --- asking: one streamed answer a chosen model, side by side --------------------------------------------
async function ask() {
  const chosen = [...document.querySelectorAll("#models input:checked")].map((box) => box.value);
  const answers = $("answers");
  answers.replaceChildren();
  $("ask").disabled = true;
  await Promise.all(chosen.map((model) => streamAnswer(model, answers)));
  $("ask").disabled = false;
}

async function streamAnswer(model, answers) {
  const card = document.createElement("div");
  card.className = "answer";
  card.dataset.model = model;
  card.innerHTML = "<h3></h3><div class=\"text\"></div><div class=\"meta\"></div>";
  card.querySelector("h3").textContent = model;
  answers.append(card);
  const text = card.querySelector(".text");
  const chat = $("mode").value === "chat";
  const body = {model, stream: true, max_tokens: Number($("max-tokens").value),
                temperature: Number($("temperature").value), stream_options: {include_usage: true}};
  if (chat) body.messages = [{role: "user", content: $("prompt").value}];
  else body.prompt = $("prompt").value;
  const started = performance.now();
  try {
    const response = await request(chat ? "/v1/chat/completions" : "/v1/completions",
                                   {method: "POST", body: JSON.stringify(body)});
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      for (const choice of event.choices) {
        text.textContent += chat ? (choice.delta.content || "") : choice.text;
      }
      if (event.usage) {
        const seconds = (performance.now() - started) / 1000;
        card.querySelector(".meta").textContent =
          `${event.usage.completion_tokens} tokens in ${seconds.toFixed(1)} s`;
      }
    }
    card.classList.add("done");
  } catch (e) {
    card.classList.add("error", "done");
    text.textContent = e.message;
  }
}

async function* serverSentEvents(response) {  // "data: {...}\n\n" ... "data: [DONE]"
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    pending += decoder.decode(value, {stream: true});
    let end;
    while ((end = pending.indexOf("\n\n")) >= 0) {
      const line = pending.slice(0, end).replace(/^data: /, "");
      pending = pending.slice(end + 2);
      if (line === "[DONE]") return;
      yield JSON.parse(line);
    }
  }
}

// --- tuning: a job on the server, its loss drawn as it learns ----------------------------------------------
function showTask() {
  const task = $("task").value;
  $("examples-box").hidden = task !== "examples";
  $("task-note").textContent = TASK_NOTES[task][0];
  $("method").value = defaultMethods[task];
}

async function train() {
  const task = $("task").value;
  const body = {name: $("name").value.trim(), method: $("method").value, steps: Number($("steps").value), task};
  if (task === "examples") {
    body.examples = $("examples").value.split("\n").filter((line) => line.includes("=>")).map((line) => {
      const [prompt, ...rest] = line.split("=>");
      return {prompt: prompt.trim(), completion: rest.join("=>").trim()};
    });
  }
  const status = $("train-status");
  status.className = "";
  try {
    $("train").disabled = true;
    const job = await call("POST", "/api/tune", body);
    await follow(job.id, task);
  } catch (e) {
    status.className = "error";
    status.textContent = e.message;
  } finally {
    $("train").disabled = false;
  }
}

async function follow(id, task) {
  for (;;) {
    const job = await call("GET", `/api/tune/${id}`);
    drawLoss(job.losses);
    const left = job.seconds_left === null ? "" : `, about ${Math.ceil(job.seconds_left)} s left`;
    const last = job.losses.length ? `, loss ${job.losses[job.losses.length - 1].toFixed(4)}` : "";
    $("train-status").textContent = `${job.name}: ${job.state}, step ${job.step} of ${job.steps}${last}${left}`;
    if (job.state === "failed") throw new Error(`${job.name}: ${job.error}`);
    if (job.state === "cancelled") return;
    if (job.state === "done") {
      $("train-status").textContent += ` in ${job.seconds} s; base unchanged: ${job.base_unchanged}. ` +
        `${job.name} joined the list.`;
      await refreshModels(job.name);
      const [, mode, prompt] = TASK_NOTES[task];
      $("mode").value = mode;
      $("prompt").value = prompt || $("examples").value.split("=>")[0].trim();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

function drawLoss(losses) {
  const svg = $("loss-chart");
  const [width, height, left, bottom] = [480, 200, 40, 20];
  if (!losses.length) {
    svg.innerHTML = `<text x="${left}" y="${height / 2}">the loss of each step appears here as it trains</text>`;
    return;
  }
  const top = Math.max(...losses, 1e-9);
  const x = (i) => left + (losses.length > 1 ? i / (losses.length - 1) : 0) * (width - left - 10);
  const y = (loss) => 10 + (1 - loss / top) * (height - bottom - 10);
  const points = losses.map((loss, i) => `${x(i).toFixed(1)},${y(loss).toFixed(1)}`).join(" ");
  svg.innerHTML = `<line class="axis" x1="${left}" y1="${height - bottom}" x2="${width}" y2="${height - bottom}"/>` +
    `<line class="axis" x1="${left}" y1="0" x2="${left}" y2="${height - bottom}"/>` +
    `<text x="2" y="14">${top.toFixed(2)}</text><text x="2" y="${height - bottom}">0</text>` +
    `<text x="${width - 60}" y="${height - 4}">step ${losses.length}</text><text x="${left + 6}" y="14">loss</text>` +
    `<polyline class="curve" points="${points}"/>`;
}

async function loadAdapter() {
  try {
    await call("POST", "/api/adapters", {name: $("load-name").value.trim(), path: $("load-path").value.trim()});
    await refreshModels($("load-name").value.trim());
  } catch (e) {
    alert(e.message);
  }
}

async function showStatus() {
  try {
    const s = await call("GET", "/api/status");
    const speed = s.tokens_per_second ? `, ${s.tokens_per_second} tokens/s` : "";
    $("status").textContent = `${s.base}: ${s.running} answering, ${s.waiting} waiting (batch up to ` +
      `${s.max_batch})${speed}${s.training ? `; training ${s.training.name}` : ""}`;
  } catch (e) {
    $("status").textContent = "the server does not answer";
  }
}

async function start() {
  const methods = await call("GET", "/api/methods");
  defaultMethods = methods.tasks;
  $("method").replaceChildren(...methods.methods.map((name) => new Option(name, name)));
  $("task").onchange = showTask;
  $("ask").onclick = ask;
  $("train").onclick = train;
  $("load").onclick = loadAdapter;
  showTask();
  drawLoss([]);
  await refreshModels();
  showStatus();
  setInterval(showStatus, 2000);
}

start();
