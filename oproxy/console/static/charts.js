// oproxy console: small SVG charts drawn from the console's JSON.
// No library: columns over time, lines over time, and horizontal bars.
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attributes, text) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attributes || {})) {
      node.setAttribute(key, String(value));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clear(svg) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
  }

  // A round step for about `count` ticks up to `max`.
  function niceStep(max, count) {
    if (!(max > 0)) return 1;
    const raw = max / count;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const factor of [1, 2, 2.5, 5, 10]) {
      if (raw <= factor * power) return factor * power;
    }
    return 10 * power;
  }

  function size(svg, fallbackHeight) {
    const width = Math.max(200, Math.round(svg.clientWidth || svg.parentNode.clientWidth || 640));
    const height = Math.round(svg.clientHeight || fallbackHeight);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "xMinYMin meet");
    return { width, height };
  }

  function clock(seconds) {
    const date = new Date(seconds * 1000);
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  }

  // The frame both time charts share: y grid and labels, x labels.
  function frame(svg, times, max, format) {
    const { width, height } = size(svg, 200);
    const left = 52, right = 10, top = 10, bottom = 24;
    const plot = { left, top, width: width - left - right, height: height - top - bottom };
    const step = niceStep(max, 4);
    const top_value = Math.max(step, Math.ceil(max / step) * step);
    const y = (value) => plot.top + plot.height - (value / top_value) * plot.height;
    for (let tick = 0; tick <= top_value + step / 2; tick += step) {
      svg.appendChild(el("line", { x1: plot.left, x2: plot.left + plot.width, y1: y(tick), y2: y(tick), class: "grid-line" }));
      svg.appendChild(el("text", { x: plot.left - 6, y: y(tick) + 4, "text-anchor": "end" }, format(tick)));
    }
    const slot = plot.width / Math.max(1, times.length);
    const x = (index) => plot.left + slot * index;
    // A label every ten minutes of the clock, as long as it has room.
    let lastLabel = -Infinity;
    times.forEach((time, index) => {
      const position = x(index) + slot / 2;
      if (Math.round(time / 60) % 10 === 0 && position - lastLabel > 48 && position < plot.left + plot.width - 20) {
        svg.appendChild(el("text", { x: position, y: height - 6, "text-anchor": "middle" }, clock(time)));
        lastLabel = position;
      }
    });
    svg.appendChild(el("line", { x1: plot.left, x2: plot.left + plot.width, y1: y(0), y2: y(0), class: "axis" }));
    return { plot, x, y, slot, height };
  }

  function empty(svg, text) {
    const { width, height } = size(svg, 200);
    svg.appendChild(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty-chart" }, text));
  }

  // Stacked columns, one a minute: series = [{name, color, values}].
  function columns(svg, times, series, format) {
    clear(svg);
    const totals = times.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
    const max = Math.max(0, ...totals);
    if (!times.length) return empty(svg, "No data");
    const f = frame(svg, times, max, format);
    const gap = Math.min(2, f.slot * 0.2);
    times.forEach((time, i) => {
      let base = 0;
      const group = el("g");
      for (const s of series) {
        const value = s.values[i] || 0;
        if (value <= 0) continue;
        const top = f.y(base + value), bottom = f.y(base);
        group.appendChild(el("rect", {
          x: f.x(i) + gap / 2, y: top, width: Math.max(1, f.slot - gap), height: Math.max(0.5, bottom - top), fill: s.color, rx: 1,
        }));
        base += value;
      }
      const hit = el("rect", { x: f.x(i), y: f.plot.top, width: f.slot, height: f.plot.height, fill: "transparent" });
      const lines = series.map((s) => `${s.name}: ${format(s.values[i] || 0)}`);
      hit.appendChild(el("title", {}, `${clock(time)}\n${lines.join("\n")}`));
      group.appendChild(hit);
      svg.appendChild(group);
    });
    if (max === 0) svg.appendChild(el("text", { x: f.plot.left + f.plot.width / 2, y: f.plot.top + f.plot.height / 2, "text-anchor": "middle", class: "empty-chart" }, "No requests in the last hour"));
  }

  // Lines over time, with gaps where a value is missing.
  function lines(svg, times, series, format) {
    clear(svg);
    const values = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
    const max = Math.max(0, ...values);
    if (!times.length) return empty(svg, "No data");
    const f = frame(svg, times, max, format);
    for (const s of series) {
      let path = "";
      let drawing = false;
      s.values.forEach((value, i) => {
        if (value === null || value === undefined) { drawing = false; return; }
        const px = f.x(i) + f.slot / 2, py = f.y(value);
        path += `${drawing ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)} `;
        drawing = true;
        svg.appendChild(el("circle", { cx: px, cy: py, r: 1.8, fill: s.color }));
      });
      if (path) svg.appendChild(el("path", { d: path, fill: "none", stroke: s.color, "stroke-width": 1.8, "stroke-linejoin": "round" }));
    }
    times.forEach((time, i) => {
      const hit = el("rect", { x: f.x(i), y: f.plot.top, width: f.slot, height: f.plot.height, fill: "transparent" });
      const text = series.map((s) => `${s.name}: ${s.values[i] === null || s.values[i] === undefined ? "–" : format(s.values[i])}`);
      hit.appendChild(el("title", {}, `${clock(time)}\n${text.join("\n")}`));
      svg.appendChild(hit);
    });
    if (!values.length) svg.appendChild(el("text", { x: f.plot.left + f.plot.width / 2, y: f.plot.top + f.plot.height / 2, "text-anchor": "middle", class: "empty-chart" }, "No data in the last hour"));
  }

  // Horizontal bars: items = [{label, value}], biggest first.
  function bars(svg, items, format, color) {
    clear(svg);
    const shown = items.slice(0, 8);
    const row = 24;
    const height = Math.max(40, shown.length * row + 8);
    svg.style.height = `${height}px`;
    const width = Math.max(200, Math.round(svg.clientWidth || svg.parentNode.clientWidth || 320));
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    if (!shown.length) {
      svg.appendChild(el("text", { x: width / 2, y: height / 2 + 4, "text-anchor": "middle", class: "empty-chart" }, "Nothing yet"));
      return;
    }
    const labelWidth = Math.min(140, width * 0.38), valueWidth = 56;
    const barWidth = width - labelWidth - valueWidth - 12;
    const max = Math.max(...shown.map((item) => item.value || 0), 1);
    shown.forEach((item, i) => {
      const y = 4 + i * row;
      const label = item.label.length > 22 ? item.label.slice(0, 21) + "…" : item.label;
      const text = el("text", { x: 0, y: y + 15 }, label);
      text.appendChild(el("title", {}, item.label));
      svg.appendChild(text);
      svg.appendChild(el("rect", { x: labelWidth, y: y + 4, width: barWidth, height: 14, fill: "#eef1f5", rx: 3 }));
      svg.appendChild(el("rect", { x: labelWidth, y: y + 4, width: Math.max(1, ((item.value || 0) / max) * barWidth), height: 14, fill: color, rx: 3 }));
      svg.appendChild(el("text", { x: width - 2, y: y + 15, "text-anchor": "end" }, format(item.value || 0)));
    });
  }

  window.OproxyCharts = { columns, lines, bars };
})();
