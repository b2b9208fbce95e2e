// Front end of captum_krypton.widget.OcclusionWidget: draws the heatmap (a float32
// buffer coloured through a 256-entry lookup table sent by Python) over the image in
// greyscale, as Captum's blended heat map; the colorbar and legend (limits, ticks and
// words computed in Python), progress and status; turns controls and mouse input
// into trait changes and messages (compute, cancel, probe).

function element(tag, className, parent, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function bytesOf(value) {
  // Binary traits arrive as DataView (or ArrayBuffer); empty ones as "" or null.
  if (!value) return new Uint8Array(0);
  if (value instanceof DataView) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  return new Uint8Array(0);
}

function floatsOf(value) {
  const bytes = bytesOf(value);
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  return new Float32Array(copy.buffer, 0, Math.floor(bytes.length / 4));
}

function slider(parent, label, className, min, max, step, value) {
  const wrap = element("label", "ckw-control", parent);
  element("span", "ckw-label", wrap, label);
  const input = element("input", className, wrap);
  Object.assign(input, { type: "range", min, max, step });
  input.value = value;
  const shown = element("span", "ckw-value", wrap, String(value));
  return { input, shown };
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "?";
  return seconds < 10 ? `${seconds.toFixed(2)} s` : `${seconds.toFixed(0)} s`;
}

function render({ model, el }) {
  const root = element("div", "ckw-root", el);
  // Keys typed into the widget (arrows on sliders) must not reach the notebook.
  root.addEventListener("keydown", (event) => event.stopPropagation());

  const controls = element("div", "ckw-controls", root);
  const window_ = slider(controls, "window", "ckw-window", 2, 64, 1, model.get("window"));
  const stride = slider(controls, "stride", "ckw-stride", 1, 32, 1, model.get("stride"));
  const approxWrap = element("label", "ckw-control", controls);
  const approximate = element("input", "ckw-approximate", approxWrap);
  approximate.type = "checkbox";
  element("span", "ckw-label", approxWrap, "approximate");
  const tau = slider(controls, "tau", "ckw-tau", 0.1, 1, 0.05, model.get("tau"));
  const drill = slider(controls, "drill-down", "ckw-drilldown", 0, 1, 0.05, model.get("drilldown"));
  const ssim = slider(controls, "target SSIM", "ckw-target-ssim", 0, 0.99, 0.01, model.get("target_ssim"));
  const targetWrap = element("label", "ckw-control", controls);
  element("span", "ckw-label", targetWrap, "class");
  const target = element("select", "ckw-target", targetWrap);
  const signWrap = element("label", "ckw-control", controls);
  element("span", "ckw-label", signWrap, "sign");
  const sign = element("select", "ckw-sign", signWrap);
  for (const name of ["all", "positive", "negative", "absolute_value"]) {
    const option = element("option", null, sign, name);
    option.value = name;
  }
  const cmapWrap = element("label", "ckw-control", controls);
  element("span", "ckw-label", cmapWrap, "colormap");
  const colormap = element("select", "ckw-colormap", cmapWrap);
  for (const name of ["auto", "viridis", "inferno", "RdBu_r", "coolwarm", "gray"]) {
    const option = element("option", null, colormap, name);
    option.value = name;
  }
  const opacity = slider(controls, "opacity", "ckw-opacity", 0, 1, 0.05, model.get("opacity"));
  const buttons = element("div", "ckw-buttons", controls);
  const compute = element("button", "ckw-compute", buttons, "Compute");
  const cancel = element("button", "ckw-cancel", buttons, "Cancel");
  const clearRoi = element("button", "ckw-clear-roi", buttons, "Whole image");

  const main = element("div", "ckw-main", root);
  const stage = element("div", "ckw-stage", main);
  const canvas = element("canvas", "ckw-heatmap", stage);
  const roiBox = element("div", "ckw-roi", stage);
  const side = element("div", "ckw-side", main);
  const legendBox = element("div", "ckw-legend-box", side);
  const legendTitle = element("div", "ckw-legend-title", legendBox);
  const scale = element("div", "ckw-scale", legendBox);
  const legend = element("canvas", "ckw-legend", scale);
  legend.width = 220;
  legend.height = 12;
  const ticks = element("div", "ckw-ticks", scale);
  const ends = element("div", "ckw-ends", scale);
  const legendNote = element("div", "ckw-legend-note", legendBox);
  const hover = element("div", "ckw-hover", side, "hover: -");
  const probeCanvas = element("canvas", "ckw-probe", side);
  const probeText = element(
    "div", "ckw-probe-text", side, "click: occlude the window there; shift-drag: compute a region only"
  );
  const progress = element("div", "ckw-progress", root);
  const status = element("div", "ckw-status", root);
  const error = element("div", "ckw-error", root);

  const base = document.createElement("canvas");
  let heat = new Float32Array(0);

  function size() {
    const [height, width] = model.get("image_size");
    return { height, width };
  }

  function drawBase() {
    const { height, width } = size();
    base.width = width;
    base.height = height;
    const pixels = bytesOf(model.get("grey_rgba"));
    if (pixels.length === width * height * 4 && width > 0) {
      base.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(pixels), width, height), 0, 0);
    }
  }

  function drawHeatmap() {
    const { height, width } = size();
    canvas.width = width;
    canvas.height = height;
    const scale = Math.max(1, Math.floor(360 / Math.max(width, height)));
    canvas.style.width = `${width * scale}px`;
    canvas.style.height = `${height * scale}px`;
    const context = canvas.getContext("2d");
    context.drawImage(base, 0, 0);
    const lut = bytesOf(model.get("colormap_lut"));
    drawLegend(lut);
    heat = floatsOf(model.get("heatmap"));
    if (heat.length !== width * height || lut.length < 1024) return;
    const [lo, hi] = model.get("value_range");
    const shownSign = model.get("sign");
    const alpha = model.get("opacity");
    const image = context.getImageData(0, 0, width, height);
    const data = image.data;
    // Position on the colorbar, 0..1: the value (|value| for absolute_value) between
    // the limits, clamped (so "positive" draws values below 0 as 0, "negative" those
    // above 0); an empty range puts everything at 0 (the middle for a signed map).
    const empty = shownSign === "all" ? 0.5 : 0;
    for (let i = 0; i < heat.length; i++) {
      const raw = heat[i];
      if (!Number.isFinite(raw)) continue; // not computed: the image shows
      const value = shownSign === "absolute_value" ? Math.abs(raw) : raw;
      const t = hi > lo ? (value - lo) / (hi - lo) : empty;
      const index = Math.max(0, Math.min(255, Math.round(t * 255))) * 4;
      const o = i * 4;
      data[o] = (1 - alpha) * data[o] + alpha * lut[index];
      data[o + 1] = (1 - alpha) * data[o + 1] + alpha * lut[index + 1];
      data[o + 2] = (1 - alpha) * data[o + 2] + alpha * lut[index + 2];
    }
    context.putImageData(image, 0, 0);
  }

  function drawLegend(lut) {
    const context = legend.getContext("2d");
    for (let x = 0; x < legend.width; x++) {
      const index = Math.round((x / (legend.width - 1)) * 255) * 4;
      context.fillStyle = lut.length >= 1024 ? `rgb(${lut[index]},${lut[index + 1]},${lut[index + 2]})` : "#ccc";
      context.fillRect(x, 0, 1, legend.height);
    }
    const info = model.get("legend") || {};
    const [lo, hi] = model.get("value_range");
    legendTitle.textContent = info.title || "";
    legendNote.textContent = info.note || "";
    ticks.replaceChildren();
    for (const [value, label] of info.ticks || []) {
      const tick = element("span", "ckw-tick", ticks, label);
      tick.dataset.value = String(value);
      const at = hi > lo ? (value - lo) / (hi - lo) : 0.5;
      tick.style.left = `${Math.max(0, Math.min(1, at)) * 100}%`;
    }
    ends.replaceChildren();
    const [left, right] = info.ends || ["", ""];
    element("span", "ckw-end ckw-end-low", ends, left);
    element("span", "ckw-end ckw-end-high", ends, right);
  }

  function drawProbe() {
    const info = model.get("probe");
    const { height, width } = size();
    const pixels = bytesOf(model.get("probe_rgba"));
    if (!info || info.y === undefined || pixels.length !== width * height * 4) return;
    probeCanvas.width = width;
    probeCanvas.height = height;
    probeCanvas.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(pixels), width, height), 0, 0);
    probeText.textContent =
      `window at (${info.y}, ${info.x}): p ${info.probability_before.toFixed(3)} → ` +
      `${info.probability_after.toFixed(3)} (drop ${info.drop.toFixed(3)})`;
  }

  function showProgress() {
    const p = model.get("progress") || {};
    if (p.done === undefined) {
      progress.textContent = model.get("running") ? "starting…" : "";
      return;
    }
    const running = model.get("running");
    progress.textContent =
      `${p.done}/${p.planned} windows (${p.total} in the exact grid), ${p.stage}, ` +
      `elapsed ${formatSeconds(p.elapsed)}` + (running ? `, about ${formatSeconds(p.eta)} left` : "");
  }

  function showRoi() {
    const roi = model.get("roi");
    const { width } = size();
    const scale = canvas.clientWidth / Math.max(width, 1);
    if (!roi || roi.length !== 4) {
      roiBox.style.display = "none";
      return;
    }
    const [top, left, bottom, right] = roi;
    Object.assign(roiBox.style, {
      display: "block",
      top: `${top * scale}px`,
      left: `${left * scale}px`,
      width: `${(right - left) * scale}px`,
      height: `${(bottom - top) * scale}px`,
    });
  }

  function syncControls() {
    window_.input.value = model.get("window");
    window_.shown.textContent = String(model.get("window"));
    stride.input.value = model.get("stride");
    stride.shown.textContent = String(model.get("stride"));
    approximate.checked = model.get("approximate");
    for (const [control, name] of [[tau, "tau"], [drill, "drilldown"], [ssim, "target_ssim"], [opacity, "opacity"]]) {
      control.input.value = model.get(name);
      control.shown.textContent = Number(model.get(name)).toFixed(2);
      if (name !== "opacity") control.input.disabled = !model.get("approximate");
    }
    colormap.value = model.get("colormap");
    sign.value = model.get("sign");
    target.replaceChildren();
    for (const entry of model.get("classes")) {
      const option = element("option", null, target, `${entry.label} (${(entry.probability * 100).toFixed(1)}%)`);
      option.value = String(entry.index);
    }
    if (![...target.options].some((o) => o.value === String(model.get("target")))) {
      const option = element("option", null, target, `class ${model.get("target")}`);
      option.value = String(model.get("target"));
    }
    target.value = String(model.get("target"));
    cancel.disabled = !model.get("running");
  }

  function bind(control, name, parse) {
    control.input.addEventListener("input", () => {
      control.shown.textContent = control.input.value;
    });
    control.input.addEventListener("change", () => {
      model.set(name, parse(control.input.value));
      model.save_changes();
    });
  }
  bind(window_, "window", (v) => parseInt(v, 10));
  bind(stride, "stride", (v) => parseInt(v, 10));
  bind(tau, "tau", parseFloat);
  bind(drill, "drilldown", parseFloat);
  bind(ssim, "target_ssim", parseFloat);
  opacity.input.addEventListener("input", () => {
    model.set("opacity", parseFloat(opacity.input.value));
    model.save_changes();
  });
  approximate.addEventListener("change", () => {
    model.set("approximate", approximate.checked);
    model.save_changes();
  });
  target.addEventListener("change", () => {
    model.set("target", parseInt(target.value, 10));
    model.save_changes();
  });
  sign.addEventListener("change", () => {
    model.set("sign", sign.value);
    model.save_changes();
  });
  colormap.addEventListener("change", () => {
    model.set("colormap", colormap.value);
    model.save_changes();
  });
  compute.addEventListener("click", () => model.send({ type: "compute" }));
  cancel.addEventListener("click", () => model.send({ type: "cancel" }));
  clearRoi.addEventListener("click", () => {
    model.set("roi", []);
    model.save_changes();
  });

  // Mouse: hover reads the value, click probes one window, shift-drag selects a region.
  function pixelAt(event) {
    const rect = canvas.getBoundingClientRect();
    const { height, width } = size();
    const x = Math.floor(((event.clientX - rect.left) / rect.width) * width);
    const y = Math.floor(((event.clientY - rect.top) / rect.height) * height);
    return { x: Math.max(0, Math.min(width - 1, x)), y: Math.max(0, Math.min(height - 1, y)) };
  }
  let dragStart = null;
  canvas.addEventListener("mousemove", (event) => {
    const { x, y } = pixelAt(event);
    const { width } = size();
    const value = heat[y * width + x];
    hover.textContent = `hover (${y}, ${x}): ${Number.isFinite(value) ? value.toPrecision(4) : "not computed"}`;
  });
  canvas.addEventListener("mousedown", (event) => {
    dragStart = event.shiftKey ? pixelAt(event) : null;
  });
  canvas.addEventListener("mouseup", (event) => {
    const point = pixelAt(event);
    if (dragStart) {
      const roi = [
        Math.min(dragStart.y, point.y),
        Math.min(dragStart.x, point.x),
        Math.max(dragStart.y, point.y) + 1,
        Math.max(dragStart.x, point.x) + 1,
      ];
      dragStart = null;
      model.set("roi", roi);
      model.save_changes();
      return;
    }
    model.send({ type: "probe", y: point.y, x: point.x });
  });

  function showStatus() {
    status.textContent = model.get("status");
    error.textContent = model.get("error");
    root.classList.toggle("ckw-running", model.get("running"));
  }

  drawBase();
  drawHeatmap();
  syncControls();
  showProgress();
  showStatus();
  showRoi();
  model.on("change:grey_rgba", () => { drawBase(); drawHeatmap(); });
  for (const name of ["heatmap", "colormap_lut", "value_range", "opacity", "sign", "legend"]) {
    model.on(`change:${name}`, drawHeatmap);
  }
  for (const name of ["window", "stride", "approximate", "tau", "drilldown", "target_ssim", "target", "classes", "sign", "colormap", "opacity", "running"]) {
    model.on(`change:${name}`, syncControls);
  }
  model.on("change:progress", showProgress);
  model.on("change:running", () => { showProgress(); showStatus(); });
  model.on("change:status", showStatus);
  model.on("change:error", showStatus);
  model.on("change:roi", showRoi);
  model.on("change:probe", drawProbe);
  model.on("change:probe_rgba", drawProbe);
}

export default { render };
