// diffserve playground: the native job API (/v1/jobs) from a browser, with no build step and no
// outside resources. Every API call carries the token field's value as `Authorization: Bearer`.
// The events stream is read with fetch() and parsed here: EventSource cannot send that header.
"use strict";

(() => {
  const TOKEN_KEY = "diffserve.token";
  const STREAM_RETRIES = 5;  // reconnects (with Last-Event-ID) of an events stream cut before the job ended
  const $ = (id) => document.getElementById(id);

  let models = new Map();   // id -> /v1/models entry
  let current = null;       // {id, abort: AbortController} of the job being followed
  let resultUrl = null;     // blob: URL of the shown result
  let previewUrl = null;    // blob: URL of the input image preview

  // ---- API -----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, param, code) {
      super(message);
      this.status = status;
      this.param = param || null;
      this.code = code || null;
    }
  }

  function authHeaders() {
    const token = $("token").value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  // An error response as ApiError: OpenAI's body {"error": {"message", "param", "code"}} when it is one.
  async function apiError(response) {
    let message = `${response.status} ${response.statusText}`, param = null, code = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        param = body.error.param;
        code = body.error.code;
      }
    } catch (_) { /* not JSON: keep the status line */ }
    return new ApiError(response.status, message, param, code);
  }

  async function api(method, path, body) {
    const init = { method, headers: authHeaders(), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (!response.ok) throw await apiError(response);
    return response;
  }

  const getJson = async (path) => (await api("GET", path)).json();

  // ---- Server-Sent Events over fetch ---------------------------------------------------------

  // Calls onEvent({id, event, data}) for each event of the text/event-stream `response` (the
  // WHATWG format: "field: value" lines, a blank line ends an event, ":" lines are comments).
  async function readSse(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", fields = { id: null, event: "message", data: [] };
    const dispatch = () => {
      if (fields.data.length) onEvent({ id: fields.id, event: fields.event, data: fields.data.join("\n") });
      fields = { id: fields.id, event: "message", data: [] };
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();  // a line not ended yet (a lone \r at the end is taken for one: SSE allows it)
      for (const line of lines) {
        if (line === "") { dispatch(); continue; }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (name === "data") fields.data.push(val);
        else if (name === "event") fields.event = val;
        else if (name === "id") fields.id = val;
      }
    }
  }

  // Follows a job's events until it ends, reconnecting with Last-Event-ID when the stream is cut.
  async function follow(job, signal) {
    let lastId = null, ended = false, retries = 0;
    while (!ended) {
      const headers = authHeaders();
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      let response;
      try {
        response = await fetch(`/v1/jobs/${encodeURIComponent(job)}/events`, { headers, signal, cache: "no-store" });
      } catch (err) {
        if (signal.aborted) return;
        response = null;
      }
      if (response && !response.ok) throw await apiError(response);
      if (response) {
        try {
          await readSse(response, (ev) => {
            if (ev.id !== null) lastId = ev.id;
            ended = onJobEvent(job, ev.event, JSON.parse(ev.data)) || ended;
          });
        } catch (err) {
          if (signal.aborted) return;
        }
      }
      if (ended || signal.aborted) return;
      if (++retries > STREAM_RETRIES) throw new ApiError(0, "lost the job's event stream; reload the job later", null, null);
      await new Promise((resolve) => setTimeout(resolve, 500 * retries));
    }
  }

  // ---- The job on screen ---------------------------------------------------------------------

  const label = (value, prefix) => (value || "").replace(prefix, "").toLowerCase().replace(/_/g, " ") || "–";

  function setProgress(step, total) {
    const bar = $("progress");
    if (total > 0) bar.max = total;
    bar.value = step;
    $("progress-text").textContent = total > 0 ? `${step}/${total}` : "–";
  }

  function showJob(job) {
    $("job-id").textContent = job.id;
    $("state").textContent = label(job.state, "JOB_STATE_");
    $("stage").textContent = label(job.stage, "STAGE_");
    $("queue-position").textContent = job.queue_position ? String(job.queue_position) : "–";
    setProgress(job.step || 0, job.total_steps || 0);
  }

  // One event of the job being followed; true when it is the job's last.
  function onJobEvent(job, kind, data) {
    if (!current || current.id !== job) return true;
    const body = data[kind] || {};
    switch (kind) {
      case "queued":
        $("state").textContent = "queued";
        $("queue-position").textContent = body.position ? String(body.position) : "–";
        return false;
      case "stage_started":
        $("state").textContent = "running";
        $("queue-position").textContent = "–";
        $("stage").textContent = label(body.stage, "STAGE_");
        return false;
      case "step_completed":
        setProgress(body.step || 0, body.total_steps || 0);
        return false;
      case "restarted":
        setProgress(0, Number($("progress").max));
        $("state").textContent = `restarted (attempt ${body.attempt || "?"}): ${body.reason || ""}`;
        return false;
      case "completed":
        finish(job, "succeeded");
        return true;
      case "failed":
      case "cancelled": {
        const status = body.status || {};
        finish(job, kind);
        showError(new ApiError(0, status.message || kind, null, null));
        return true;
      }
      default:
        return false;
    }
  }

  async function finish(job, state) {
    current.ended = true;
    $("state").textContent = state;
    $("cancel").disabled = true;
    $("submit").disabled = false;
    if (state !== "succeeded") return;
    try {
      const record = await getJson(`/v1/jobs/${encodeURIComponent(job)}`);
      showJob(record);
      const response = await api("GET", `/v1/jobs/${encodeURIComponent(job)}/content`);
      const blob = await response.blob();
      if (!current || current.id !== job) return;
      await showResult(record, blob);
    } catch (err) {
      showError(err);
    }
  }

  async function showResult(job, blob) {
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(blob);
    const artifact = job.artifact || {};
    const image = $("result-image"), video = $("result-video");
    const type = blob.type || artifact.media_type || "";
    image.hidden = true;
    video.hidden = true;
    $("seed").textContent = job.params && job.params.seed !== undefined ? String(job.params.seed) : "";
    const size = `${artifact.width || "?"}×${artifact.height || "?"}`;
    $("result-size").textContent = artifact.num_frames > 1 ? `${size}, ${artifact.num_frames} frames` : size;
    const link = $("download");
    link.href = resultUrl;
    link.download = artifact.file_name || `${job.id}`;
    $("result").hidden = false;
    if (type.startsWith("image/")) {
      image.src = resultUrl;
      image.hidden = false;
      await image.decode();
    } else if (type.startsWith("video/")) {
      video.src = resultUrl;
      video.hidden = false;
      await new Promise((resolve) => {
        video.addEventListener("loadedmetadata", resolve, { once: true });
        video.addEventListener("error", resolve, { once: true });  // a codec the browser lacks: the download link stays
      });
    }
    $("result").dataset.ready = "true";
  }

  function resetJob() {
    if (current) current.abort.abort();
    current = null;
    for (const id of ["job-id", "state", "stage", "queue-position"]) $(id).textContent = "–";
    setProgress(0, 0);
    $("result").hidden = true;
    delete $("result").dataset.ready;
    $("result-image").removeAttribute("src");
    $("result-video").removeAttribute("src");
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = null;
  }

  function showError(err) {
    const box = $("error");
    if (!err) {
      box.hidden = true;
      box.textContent = "";
      delete box.dataset.param;
      return;
    }
    const param = err.param ? ` (param: ${err.param})` : "";
    box.textContent = `${err.message}${param}`;
    if (err.param) box.dataset.param = err.param; else delete box.dataset.param;
    box.hidden = false;
  }

  // ---- Models --------------------------------------------------------------------------------

  const takesImages = (m) => Boolean((m.limits && (m.limits.max_images > 0 || m.limits.image_required))
    || m.task === "image-edit" || m.task === "image-to-video");
  const isVideo = (m) => (m.task || "").endsWith("video");

  function showModel() {
    const m = models.get($("model").value);
    const info = $("model-info");
    info.replaceChildren();
    if (!m) return;
    const d = m.defaults || {}, l = m.limits || {};
    const rows = [
      ["Task", m.task || "–"], ["Family", m.family || "–"], ["Serving", m.serving ? "yes" : "no (jobs wait in the queue)"],
      ["Defaults", [d.width && d.height ? `${d.width}×${d.height}` : "size from the input image",
        isVideo(m) ? `${d.num_frames || 1} frames` : "", `${d.num_inference_steps || "?"} steps`,
        d.guidance_scale !== undefined ? `guidance ${d.guidance_scale}` : ""].filter(Boolean).join(", ")],
      ["Limits", [l.size_multiple ? `size a multiple of ${l.size_multiple}` : "",
        l.max_width ? `≤ ${l.max_width}×${l.max_height}` : "", l.frame_step ? `frames = ${l.frame_step}·k + 1` : "",
        l.max_num_inference_steps ? `≤ ${l.max_num_inference_steps} steps` : ""].filter(Boolean).join(", ") || "–"],
    ];
    for (const [name, value] of rows) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value;
      info.append(dt, dd);
    }
    $("steps").placeholder = d.num_inference_steps ? `default ${d.num_inference_steps}` : "default";
    $("width").placeholder = d.width ? `default ${d.width}` : "from the image";
    $("height").placeholder = d.height ? `default ${d.height}` : "from the image";
    $("frames").placeholder = d.num_frames ? `default ${d.num_frames}` : "default";
    $("guidance").placeholder = d.guidance_scale !== undefined ? `default ${d.guidance_scale}` : "default";
    $("negative-prompt").placeholder = d.negative_prompt ? `default: ${d.negative_prompt}` : "";
    for (const id of ["width", "height"]) {
      $(id).step = l.size_multiple || 1;
      $(id).min = l.size_multiple || 1;
      $(id).max = (id === "width" ? l.max_width : l.max_height) || "";
    }
    $("steps").max = l.max_num_inference_steps || "";
    $("frames").max = l.max_num_frames || "";
    $("frames-row").hidden = !isVideo(m);
    $("image-row").hidden = !takesImages(m);
    $("prompt").required = Boolean(l.prompt_required);
    $("image").required = Boolean(l.image_required);
  }

  async function loadModels() {
    showError(null);
    const select = $("model");
    const chosen = select.value;
    try {
      const list = (await getJson("/v1/models")).data || [];
      models = new Map(list.map((m) => [m.id, m]));
      select.replaceChildren(...list.map((m) => {
        const option = document.createElement("option");
        option.value = m.id;
        option.textContent = `${m.id} (${m.task || "?"})`;
        return option;
      }));
      if (models.has(chosen)) select.value = chosen;
      select.dataset.loaded = "true";
    } catch (err) {
      models = new Map();
      select.replaceChildren();
      delete select.dataset.loaded;
      showError(err);
    }
    showModel();
  }

  // ---- Submit --------------------------------------------------------------------------------

  // The file's bytes as base64 (proto3 JSON's form of `bytes`).
  function readBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  const intField = (id) => {
    const value = $(id).value.trim();
    return value === "" ? undefined : Number(value);
  };

  // GenerationParams as proto3 JSON; blank fields stay unset (the model's defaults).
  async function buildParams() {
    const m = models.get($("model").value);
    const params = { model: $("model").value, prompt: $("prompt").value };
    const negative = $("negative-prompt").value;
    if (negative !== "") params.negative_prompt = negative;
    const seed = $("seed-input").value.trim();
    if (seed !== "") params.seed = seed;  // uint64: a decimal string in proto3 JSON (no float rounding)
    const fields = { num_inference_steps: "steps", width: "width", height: "height", guidance_scale: "guidance" };
    if (m && isVideo(m)) fields.num_frames = "frames";
    for (const [name, id] of Object.entries(fields)) {
      const value = intField(id);
      if (value !== undefined) params[name] = value;
    }
    const file = $("image").files[0];
    if (file && m && takesImages(m)) params.images = [{ data: await readBase64(file) }];
    return params;
  }

  async function submit(event) {
    event.preventDefault();
    showError(null);
    resetJob();
    $("submit").disabled = true;
    try {
      const created = await (await api("POST", "/v1/jobs", { params: await buildParams() })).json();
      const job = created.job;
      current = { id: job.id, abort: new AbortController() };
      showJob(job);
      $("cancel").disabled = false;
      await follow(job.id, current.abort.signal);
    } catch (err) {
      showError(err);
      $("submit").disabled = false;
      $("cancel").disabled = true;
    }
  }

  async function cancel() {
    if (!current) return;
    const following = current;
    $("cancel").disabled = true;
    try {
      await api("DELETE", `/v1/jobs/${encodeURIComponent(following.id)}`);
      // the job stops at its next step; its `cancelled` event (or a last `completed`) ends it on screen
      if (current === following && !following.ended) $("state").textContent = "cancelling";
    } catch (err) {
      showError(err);
    }
  }

  function preview() {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    const file = $("image").files[0], img = $("image-preview");
    img.hidden = !file;
    if (file) {
      previewUrl = URL.createObjectURL(file);
      img.src = previewUrl;
    } else {
      img.removeAttribute("src");
    }
  }

  // ---- Wiring --------------------------------------------------------------------------------

  function init() {
    const token = $("token");
    token.value = sessionStorage.getItem(TOKEN_KEY) || "";
    token.addEventListener("input", () => {
      const value = token.value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
    });
    token.addEventListener("change", loadModels);
    $("reload-models").addEventListener("click", loadModels);
    $("model").addEventListener("change", showModel);
    $("image").addEventListener("change", preview);
    $("form").addEventListener("submit", submit);
    $("cancel").addEventListener("click", cancel);
    $("reuse-seed").addEventListener("click", () => { $("seed-input").value = $("seed").textContent; });
    loadModels();
  }

  init();
})();
