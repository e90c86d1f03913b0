/* The slide viewer of the ChatEXAONEPath app: OpenSeadragon over the session's deep-zoom tiles, with the
 * attention overlay and tissue outline drawn in level-0 coordinates through the viewer's full affine map (so they
 * turn with the slide), a scale bar and magnification that follow the zoom, positions and lengths in µm,
 * click-to-inspect, region drawing, a measuring line, flights to evidence, full-page mode and a PNG export of
 * the view. The page's gr.HTML component calls CXPViewer.mount(element, props, trigger, watch); its value is
 * the config the server publishes (viewer.py). Nothing here is fetched from outside the app.
 */
(function () {
  "use strict";

  // Viridis at 9 stops (matplotlib's), interpolated: the same perceptual map as the static heatmap.
  const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  const BUCKETS = 64;
  const COLOURS = Array.from({length: BUCKETS}, (_, i) => colourAt(i / (BUCKETS - 1)));
  // The marks, one colour each (the key in the stage and the help list them).
  const MARK = {patch: "#ffffff", place: "#ec4899", region: "#facc15", measure: "#22d3ee", tissue: "#00a03c",
    hole: "#1e5adc"};
  const SCALEBAR_TARGET_PX = 110;  // about this long on screen, rounded to 1, 2 or 5 × 10^k µm
  // The attention fades when zoomed in to cells (an objective-equivalent magnification): full opacity up to
  // 10×, a third of it from 40×, so the stain shows through where one looks at cells.
  const FADE_FROM = 10, FADE_TO = 40, FADE_MIN = 0.33;

  function colourAt(unit) {
    const scaled = Math.min(Math.max(unit, 0), 1) * (VIRIDIS.length - 1);
    const low = Math.floor(scaled), high = Math.min(low + 1, VIRIDIS.length - 1), t = scaled - low;
    const mix = VIRIDIS[low].map((c, k) => Math.round(c + (VIRIDIS[high][k] - c) * t));
    return `rgb(${mix[0]}, ${mix[1]}, ${mix[2]})`;
  }

  // -- plain number formats (the same as webapp/wording.py) ---------------------------------------------------
  const grouped = (n) => Math.round(n).toLocaleString("en-US");
  function fmtLength(um) {
    if (!Number.isFinite(um)) return "?";
    if (um >= 2000) return `${(um / 1000).toFixed(2)} mm`;
    return um < 10 ? `${um.toFixed(1)} µm` : `${grouped(um)} µm`;
  }
  function fmtArea(um2) {
    if (um2 < 10000) return `${grouped(um2)} µm²`;
    const mm2 = um2 / 1e6;
    return mm2 < 10 ? `${mm2.toFixed(3)} mm²` : `${mm2.toFixed(1)} mm²`;
  }
  function fmtShare(weight) {
    const percent = 100 * weight;
    if (!Number.isFinite(percent)) return "?";
    if (percent >= 10) return `${percent.toFixed(0)} %`;
    if (percent >= 0.1) return `${percent.toFixed(1)} %`;
    if (percent >= 0.01) return `${percent.toFixed(2)} %`;
    return "< 0.01 %";
  }
  function niceLength(um) {  // the largest 1, 2 or 5 × 10^k not above `um`
    const power = Math.pow(10, Math.floor(Math.log10(um)));
    return [5, 2, 1].map((m) => m * power).find((v) => v <= um) || power;
  }

  function regionText(r) { return `${r[0]},${r[1]},${r[2]},${r[3]}`; }
  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  class SlideViewer {
    constructor(root, trigger) {
      this.root = root;
      this.trigger = trigger;
      const q = (selector) => root.querySelector(selector);
      this.host = q(".cxp-osd");
      this.stage = q(".cxp-stage");
      this.empty = q(".cxp-empty");
      this.inspect = q(".cxp-inspect");
      this.scalebar = q(".cxp-scalebar");
      this.help = q(".cxp-help");
      this.canvas = element("canvas", "cxp-overlay");
      this.config = null;
      this.overlay = null;
      this.viewer = null;
      this.highlight = null;  // [x, y, w, h] of a region the chat pointed to
      this.selected = null;  // index of the patch shown in the panel
      this.mode = null;  // null | "region" | "measure": what a drag on the slide does
      this.drag = null;
      this.measurement = null;  // [[x0, y0], [x1, y1]] level-0
      this.lastGoto = null;
      this.tilesLoaded = 0;
      this.showHeat = true;
      this.showOutline = true;
      this.opacity = Number(q(".cxp-opacity").value);
      this.scale = q(".cxp-scale").value;
      this.wireToolbar();
      this.stage.addEventListener("mousemove", (e) => this.onMove(e));
      this.stage.addEventListener("mouseleave", () => { q(".cxp-cursor").textContent = ""; });
    }

    wireToolbar() {
      const q = (selector) => this.root.querySelector(selector);
      const settings = () => { this.draw(); this.reportSettings(); };
      q(".cxp-heat").addEventListener("change", (e) => { this.showHeat = e.target.checked; this.updateLegend(); settings(); });
      q(".cxp-scale").addEventListener("change", (e) => { this.scale = e.target.value; this.updateLegend(); settings(); });
      q(".cxp-opacity").addEventListener("input", (e) => { this.opacity = Number(e.target.value); this.draw(); });
      q(".cxp-opacity").addEventListener("change", () => this.reportSettings());
      q(".cxp-outline").addEventListener("change", (e) => { this.showOutline = e.target.checked; this.draw(); });
      q(".cxp-draw").addEventListener("click", () => this.setMode(this.mode === "region" ? null : "region"));
      q(".cxp-measure").addEventListener("click", () => {
        if (this.mode === "measure" || this.measurement) { this.measurement = null; this.setMode(null); }
        else this.setMode("measure");
      });
      q(".cxp-view").addEventListener("click", () => this.useCurrentView());
      q(".cxp-rotate-left").addEventListener("click", () => this.rotate(-90));
      q(".cxp-rotate-right").addEventListener("click", () => this.rotate(90));
      q(".cxp-home").addEventListener("click", () => this.resetView());
      q(".cxp-fullpage").addEventListener("click", () => this.setFullPage(!document.body.classList.contains("cxp-fullpage")));
      q(".cxp-export").addEventListener("click", () => this.exportView());
      q(".cxp-help-button").addEventListener("click", () => this.toggleHelp());
      document.addEventListener("keydown", (e) => {
        if (e.key !== "Escape") return;
        if (!this.help.hidden) this.toggleHelp(false);
        else if (this.mode || this.drag) this.setMode(null);
        else if (this.measurement) { this.measurement = null; this.draw(); }
        else if (document.body.classList.contains("cxp-fullpage")) this.setFullPage(false);
      });
      document.addEventListener("fullscreenchange", () => {
        if (!document.fullscreenElement && document.body.classList.contains("cxp-fullpage")) this.setFullPage(false);
      });
    }

    /** The toolbar's attention settings, for the page's thumbnail (the toolbar is the one overlay control). */
    reportSettings() {
      this.trigger("input", {heat: this.showHeat, opacity: this.opacity, scale: this.scale});
    }

    // -- the config from the server ---------------------------------------------------------------------
    async show(config) {
      if (typeof config === "string") config = config ? JSON.parse(config) : null;
      if (!config || !config.token) { this.close(); return; }
      if (!this.config || this.config.token !== config.token) await this.open(config);
      this.config = config;
      if (config.goto && config.goto.n !== this.lastGoto) {
        this.lastGoto = config.goto.n;
        this.flyTo([config.goto.x, config.goto.y, config.goto.w, config.goto.h]);
      }
      this.draw();
    }

    async open(config) {
      this.close();
      const base = new URL(config.base, document.baseURI);
      this.cookiePath = base.pathname;
      // The key goes with every request for this slide's URLs (tiles, <img> thumbnails) and no others.
      document.cookie = `cxp_viewer=${config.key}; path=${this.cookiePath}; SameSite=Strict`;
      this.base = base.href;
      this.config = config;
      this.lastGoto = null;
      this.root.dataset.token = config.token;
      this.empty.hidden = true;
      const vendor = new URL("viewer/static/vendor/openseadragon/images/", document.baseURI).href;
      this.viewer = OpenSeadragon({
        element: this.host, prefixUrl: vendor, drawer: "canvas", showNavigator: true,
        navigatorPosition: "BOTTOM_RIGHT", showRotationControl: false, showFullPageControl: false,
        maxZoomPixelRatio: 4, visibilityRatio: 0.3, animationTime: 0.6, imageLoaderLimit: 6,
        gestureSettingsMouse: {clickToZoom: false, dblClickToZoom: true},
        tileSources: {
          width: config.width, height: config.height, tileSize: config.tile_size,
          tileOverlap: config.overlap, minLevel: 0, maxLevel: config.levels - 1,
          getTileUrl: (level, x, y) => `${this.base}tiles/${level}/${x}_${y}.jpeg`,
        },
      });
      const viewer = this.viewer;
      viewer.addHandler("open", () => {
        viewer.canvas.appendChild(this.canvas);
        this.root.dataset.open = "1";
        if (this.pendingFlight) {
          const rect = this.pendingFlight;
          this.pendingFlight = null;
          this.flyTo(rect);
        }
        this.draw();
      });
      viewer.addHandler("tile-loaded", () => { this.root.dataset.tiles = String(++this.tilesLoaded); });
      viewer.addHandler("update-viewport", () => this.draw());
      viewer.addHandler("resize", () => this.draw());
      viewer.addHandler("rotate", () => { this.root.dataset.rotation = String(this.rotation()); });
      viewer.addHandler("animation-finish", () => { this.root.dataset.settled = String(Date.now()); });
      // Home (the 0 key, the home button) also undoes a rotation: the whole slide, upright.
      viewer.addHandler("home", () => { if (viewer.viewport.getRotation() % 360) viewer.viewport.setRotation(0); });
      // F would mirror the slide; nothing here draws mirrored, and a pathologist never needs it.
      viewer.addHandler("canvas-key", (e) => { if (e.originalEvent.code === "KeyF") e.preventDefaultAction = true; });
      viewer.addHandler("canvas-click", (e) => this.onClick(e));
      viewer.addHandler("canvas-press", (e) => this.onPress(e));
      viewer.addHandler("canvas-drag", (e) => this.onDrag(e));
      viewer.addHandler("canvas-release", (e) => this.onRelease(e));
      const response = await fetch(`${this.base}overlay.json`, {credentials: "same-origin"});
      if (!response.ok) throw new Error(`overlay: HTTP ${response.status}`);
      this.setOverlay(await response.json());
      if (!this.showHeat || this.scale !== "weight" || this.opacity !== 0.3) this.reportSettings();
    }

    setOverlay(data) {
      const n = data.x.length;
      const weight = Float64Array.from(data.weight);
      let low = Infinity, high = 0;
      weight.forEach((w) => { low = Math.min(low, w); high = Math.max(high, w); });
      this.overlay = {
        side: data.patch_side, n, x: Int32Array.from(data.x), y: Int32Array.from(data.y), weight,
        rank: Int32Array.from(data.rank), tissue: data.tissue, top: data.top, map: data.map, low, high,
      };
      this.root.dataset.patches = String(n);
      this.updateLegend();
      this.draw();
    }

    updateLegend() {
      const o = this.overlay, q = (s) => this.root.querySelector(s);
      if (!o) return;
      // Nearly equal weights: say so, because a colour scale (the rank's above all) makes them look different.
      const flat = o.n > 1 && o.high <= 1.5 * o.low;
      const spread = `weights ${fmtShare(o.low)}–${fmtShare(o.high)} of the attention`;
      // In a case each slide has its own map: the legend names the slide it colours.
      const which = this.config && this.config.slides > 1 ? ` · slide ${this.config.slide + 1}` : "";
      if (this.scale === "rank") {
        q(".cxp-legend-low").textContent = "lowest";
        q(".cxp-legend-high").textContent = "highest";
        q(".cxp-legend-name").textContent = `rank of ${o.n}${which}${flat ? " · nearly equal" : ""}`;
      } else {
        q(".cxp-legend-low").textContent = "0";
        q(".cxp-legend-high").textContent = fmtShare(o.high);
        q(".cxp-legend-name").textContent = `attention${which}${flat ? " · nearly equal" : ""}`;
      }
      const legend = q(".cxp-legend");
      legend.hidden = !this.showHeat;
      legend.classList.toggle("cxp-flat", flat);
      legend.title = `${o.n} patches, ${spread} (all add up to 100 %). ` + (this.scale === "rank"
        ? "By rank: the colours spread the patches evenly over the scale, however small their differences."
        : "By weight: a patch's colour is proportional to its share; equal shares look equal.");
    }

    close() {
      if (this.viewer) this.viewer.destroy();
      if (this.cookiePath) document.cookie = `cxp_viewer=; path=${this.cookiePath}; max-age=0`;
      this.viewer = this.config = this.overlay = this.highlight = this.selected = this.pendingFlight = null;
      this.measurement = this.drag = null;
      this.tilesLoaded = 0;
      this.inspect.hidden = true;
      this.empty.hidden = false;
      this.scalebar.dataset.microns = "";
      delete this.root.dataset.open;
      delete this.root.dataset.token;
    }

    // -- geometry: level-0 pixels ↔ pixels of the viewer element -------------------------------------------
    image() { return this.viewer && this.viewer.world.getItemAt(0); }
    rotation() { return this.viewer ? ((this.viewer.viewport.getRotation(true) % 360) + 360) % 360 : 0; }

    transform() {
      // The full affine map (rotation included), from where three image points land on screen:
      // screen = origin + x·u + y·v.
      const item = this.image();
      if (!item) return null;
      const P = OpenSeadragon.Point, W = this.config.width, H = this.config.height;
      const o = item.imageToViewerElementCoordinates(new P(0, 0));
      const ex = item.imageToViewerElementCoordinates(new P(W, 0));
      const ey = item.imageToViewerElementCoordinates(new P(0, H));
      const ux = (ex.x - o.x) / W, uy = (ex.y - o.y) / W, vx = (ey.x - o.x) / H, vy = (ey.y - o.y) / H;
      return {ox: o.x, oy: o.y, ux, uy, vx, vy, scale: Math.hypot(ux, uy), det: ux * vy - uy * vx};
    }

    toScreen(t, x, y) { return [t.ox + x * t.ux + y * t.vx, t.oy + x * t.uy + y * t.vy]; }

    fromScreen(t, sx, sy) {
      const dx = sx - t.ox, dy = sy - t.oy;
      return [(dx * t.vy - dy * t.vx) / t.det, (dy * t.ux - dx * t.uy) / t.det];
    }

    toImage(position) {
      const point = this.image().viewerElementToImageCoordinates(position);
      return [point.x, point.y];
    }

    /** A level-0 rectangle on screen: its four corners (a rotated rectangle at any angle). */
    corners(t, rect) {
      const [x, y, w, h] = rect;
      return [this.toScreen(t, x, y), this.toScreen(t, x + w, y), this.toScreen(t, x + w, y + h), this.toScreen(t, x, y + h)];
    }

    umPerScreenPixel(t) { return this.config.mpp / t.scale; }

    // -- drawing the overlay ------------------------------------------------------------------------------
    draw() {
      const t = this.viewer && this.config && this.transform();
      if (!t) return;
      const ratio = window.devicePixelRatio || 1;
      const width = this.viewer.container.clientWidth, height = this.viewer.container.clientHeight;
      if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(height * ratio)) {
        this.canvas.width = Math.round(width * ratio);
        this.canvas.height = Math.round(height * ratio);
        this.canvas.style.width = `${width}px`;
        this.canvas.style.height = `${height}px`;
      }
      const ctx = this.canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);
      const alpha = this.heatAlpha(t);
      if (this.overlay && this.showHeat && alpha > 0) this.drawHeat(ctx, t, width, height, alpha);
      if (this.overlay && this.showOutline) this.drawOutline(ctx, t);
      if (this.config.region) this.drawRegion(ctx, t, this.config.region);
      if (this.drag && this.drag.rect) this.drawBox(ctx, t, this.drag.rect, MARK.region, [2, 3]);
      if (this.highlight) this.drawBox(ctx, t, this.highlight, MARK.place, []);
      if (this.selected !== null && this.overlay) {
        const o = this.overlay, i = this.selected;
        this.drawBox(ctx, t, [o.x[i], o.y[i], o.side, o.side], MARK.patch, []);
      }
      const line = this.drag && this.drag.line ? this.drag.line : this.measurement;
      if (line) this.drawMeasurement(ctx, t, line);
      this.updateReadout(t);
      this.root.dataset.drawn = String(Date.now());
    }

    heatAlpha(t) {
      const magnification = 10 / this.umPerScreenPixel(t);
      const fade = magnification <= FADE_FROM ? 1 : magnification >= FADE_TO ? FADE_MIN
        : 1 - (1 - FADE_MIN) * (magnification - FADE_FROM) / (FADE_TO - FADE_FROM);
      this.root.dataset.fade = fade.toFixed(3);
      return this.opacity * fade;
    }

    unitOf(i) {
      const o = this.overlay;
      if (this.scale === "rank") return (o.n - o.rank[i]) / Math.max(o.n - 1, 1);
      return o.high > 0 ? o.weight[i] / o.high : 0;  // proportional: equal weights, one colour
    }

    drawHeat(ctx, t, width, height, alpha) {
      const o = this.overlay;
      // The level-0 box that can reach the screen: the screen's corners mapped back, one patch of margin.
      const back = [[0, 0], [width, 0], [width, height], [0, height]].map(([sx, sy]) => this.fromScreen(t, sx, sy));
      const minX = Math.min(...back.map((p) => p[0])) - o.side, maxX = Math.max(...back.map((p) => p[0]));
      const minY = Math.min(...back.map((p) => p[1])) - o.side, maxY = Math.max(...back.map((p) => p[1]));
      const upright = Math.abs(t.uy) < 1e-9 * t.scale || Math.abs(t.ux) < 1e-9 * t.scale;  // 0, 90, 180, 270°
      const paths = Array.from({length: BUCKETS}, () => new Path2D());
      for (let i = 0; i < o.n; i++) {
        const x = o.x[i], y = o.y[i];
        if (x < minX || x > maxX || y < minY || y > maxY) continue;
        const path = paths[Math.min(BUCKETS - 1, Math.floor(this.unitOf(i) * BUCKETS))];
        if (upright) {  // whole screen pixels, so neighbouring squares neither overlap nor leave seams
          const [ax, ay] = this.toScreen(t, x, y), [bx, by] = this.toScreen(t, x + o.side, y + o.side);
          const x0 = Math.round(Math.min(ax, bx)), y0 = Math.round(Math.min(ay, by));
          const x1 = Math.round(Math.max(ax, bx)), y1 = Math.round(Math.max(ay, by));
          path.rect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0));
        } else {
          const c = this.corners(t, [x, y, o.side, o.side]);
          path.moveTo(c[0][0], c[0][1]);
          for (let k = 1; k < 4; k++) path.lineTo(c[k][0], c[k][1]);
          path.closePath();
        }
      }
      ctx.globalAlpha = alpha;
      paths.forEach((path, bucket) => { ctx.fillStyle = COLOURS[bucket]; ctx.fill(path); });
      ctx.globalAlpha = 1;
    }

    drawOutline(ctx, t) {
      ctx.lineWidth = 2;
      for (const ring of this.overlay.tissue) {
        const p = ring.points;
        if (p.length < 4) continue;
        ctx.strokeStyle = ring.hole ? MARK.hole : MARK.tissue;
        ctx.beginPath();
        let [sx, sy] = this.toScreen(t, p[0], p[1]);
        ctx.moveTo(sx, sy);
        for (let k = 2; k < p.length; k += 2) {
          [sx, sy] = this.toScreen(t, p[k], p[k + 1]);
          ctx.lineTo(sx, sy);
        }
        ctx.closePath();
        ctx.stroke();
      }
    }

    polygon(ctx, points) {
      ctx.beginPath();
      ctx.moveTo(points[0][0], points[0][1]);
      for (let k = 1; k < points.length; k++) ctx.lineTo(points[k][0], points[k][1]);
      ctx.closePath();
    }

    drawBox(ctx, t, rect, colour, dash) {
      const points = this.corners(t, rect);
      ctx.save();
      ctx.setLineDash(dash);
      ctx.lineWidth = 4;
      ctx.strokeStyle = "rgba(0, 0, 0, 0.55)";  // a dark rim: the mark shows on pale and dark tissue alike
      this.polygon(ctx, points);
      ctx.stroke();
      ctx.lineWidth = 2;
      ctx.strokeStyle = colour;
      ctx.stroke();
      ctx.restore();
    }

    drawRegion(ctx, t, rect) {
      this.drawBox(ctx, t, rect, MARK.region, [6, 4]);
      const mpp = this.config.mpp;
      const label = `${fmtLength(rect[2] * mpp)} × ${fmtLength(rect[3] * mpp)} · ${fmtArea(rect[2] * rect[3] * mpp * mpp)}`;
      const points = this.corners(t, rect);
      const top = points.reduce((a, b) => (b[1] < a[1] || (b[1] === a[1] && b[0] < a[0]) ? b : a));
      this.label(ctx, label, top[0], top[1] - 6, MARK.region);
    }

    drawMeasurement(ctx, t, line) {
      const [a, b] = line.map(([x, y]) => this.toScreen(t, x, y));
      ctx.save();
      ctx.lineCap = "round";
      ctx.lineWidth = 5;
      ctx.strokeStyle = "rgba(0, 0, 0, 0.55)";
      ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
      ctx.lineWidth = 2.5;
      ctx.strokeStyle = MARK.measure;
      ctx.stroke();
      ctx.restore();
      this.label(ctx, fmtLength(this.lineMicrons(line)), (a[0] + b[0]) / 2 + 8, (a[1] + b[1]) / 2 - 8, MARK.measure);
    }

    lineMicrons(line) {
      return Math.hypot(line[1][0] - line[0][0], line[1][1] - line[0][1]) * this.config.mpp;
    }

    label(ctx, text, x, y, colour) {
      ctx.save();
      ctx.font = "600 13px system-ui, sans-serif";
      const width = ctx.measureText(text).width;
      ctx.fillStyle = "rgba(17, 24, 39, 0.78)";
      ctx.fillRect(x - 3, y - 14, width + 6, 18);
      ctx.fillStyle = colour;
      ctx.fillText(text, x, y);
      ctx.restore();
    }

    // -- scale bar, magnification, cursor -----------------------------------------------------------------
    updateReadout(t) {
      const umPerPx = this.umPerScreenPixel(t);
      const microns = niceLength(umPerPx * SCALEBAR_TARGET_PX);
      const barPx = microns / umPerPx;
      this.scalebar.style.width = `${barPx}px`;
      this.scalebar.dataset.microns = String(microns);
      this.scalebar.querySelector(".cxp-scalebar-label").textContent = fmtLength(microns);
      const magnification = 10 / umPerPx;
      const mag = this.root.querySelector(".cxp-mag");
      mag.textContent = `≈ ${magnification >= 10 ? magnification.toFixed(0) : magnification.toFixed(1)}×`;
      mag.title = `Like a ${magnification.toFixed(1)}× objective: ${umPerPx.toPrecision(3)} µm of slide per screen ` +
        `pixel (the scan has ${this.config.mpp.toPrecision(3)} µm per pixel, about ${(10 / this.config.mpp).toFixed(0)}×)`;
      const rotation = this.rotation();
      this.root.querySelector(".cxp-home").classList.toggle("cxp-rotated", Math.round(rotation) % 360 !== 0);
      const measured = this.root.querySelector(".cxp-measured");
      measured.textContent = this.measurement ? `line ${fmtLength(this.lineMicrons(this.measurement))}` : "";
    }

    onMove(event) {
      if (!this.viewer || !this.image() || !this.config) return;
      const box = this.viewer.container.getBoundingClientRect();
      const [x, y] = this.toImage(new OpenSeadragon.Point(event.clientX - box.left, event.clientY - box.top));
      const cursor = this.root.querySelector(".cxp-cursor");
      if (x < 0 || y < 0 || x > this.config.width || y > this.config.height) { cursor.textContent = ""; return; }
      cursor.textContent = `x ${grouped(x * this.config.mpp)} µm · y ${grouped(y * this.config.mpp)} µm`;
      cursor.title = `pixel (${grouped(x)}, ${grouped(y)}) at full resolution, from the slide's top-left corner`;
    }

    // -- click to inspect ----------------------------------------------------------------------------
    patchAt(x, y) {
      const o = this.overlay;
      if (!o) return null;
      for (let i = 0; i < o.n; i++) {
        if (x >= o.x[i] && x < o.x[i] + o.side && y >= o.y[i] && y < o.y[i] + o.side) return i;
      }
      return null;
    }

    onClick(event) {
      if (this.mode || !event.quick || !this.overlay) return;
      const [x, y] = this.toImage(event.position);
      const index = this.patchAt(x, y);
      if (index === null) {
        this.selected = null;
        this.draw();
        this.showPanel([], `No patch here (x ${grouped(x * this.config.mpp)} µm, y ${grouped(y * this.config.mpp)} µm):` +
          " the model read only the tissue patches.");
        return;
      }
      this.showPatch(index);
    }

    /** The panel over the slide: a picture (or none) and a sentence, with a close button. */
    showPanel(nodes, text, title) {
      this.inspect.hidden = false;
      this.inspect.innerHTML = "";
      const close = element("button", "cxp-inspect-close", "×");
      close.type = "button";
      close.title = "Close";
      close.addEventListener("click", () => { this.inspect.hidden = true; this.selected = null; this.draw(); });
      const words = element("div", "cxp-inspect-text", text);
      if (title) words.title = title;
      this.inspect.append(...nodes, words, close);
    }

    showPatch(index) {
      const o = this.overlay, mpp = this.config.mpp;
      this.selected = index;
      this.highlight = null;
      this.inspect.dataset.index = String(index);
      const img = element("img");
      img.src = `${this.base}patch/${index}.jpeg`;
      img.alt = "the patch at full resolution";
      const centre = `x ${grouped((o.x[index] + o.side / 2) * mpp)} µm, y ${grouped((o.y[index] + o.side / 2) * mpp)} µm`;
      // The slide's own map (an answer's chip gives the share in that answer, a region's own attention).
      this.showPanel([img], `Patch ranked ${o.rank[index]} of ${o.n} on the whole slide: ${fmtShare(o.weight[index])} ` +
        `of the slide's attention. ${fmtLength(o.side * mpp)} square, centre at ${centre}.`,
        `${o.map} ${o.weight[index].toPrecision(4)}; top-left pixel (${grouped(o.x[index])}, ${grouped(o.y[index])}), ` +
        `${o.side} × ${o.side} pixels at full resolution`);
      this.draw();
    }

    showRegion(rect) {
      const mpp = this.config.mpp;
      const img = element("img");
      img.src = `${this.base}region/${rect.map(Math.round).join(",")}.jpeg`;
      img.alt = "the region";
      this.selected = null;
      delete this.inspect.dataset.index;
      this.showPanel([img], `Region of ${fmtLength(rect[2] * mpp)} × ${fmtLength(rect[3] * mpp)} ` +
        `(${fmtArea(rect[2] * rect[3] * mpp * mpp)}) at x ${grouped(rect[0] * mpp)} µm, y ${grouped(rect[1] * mpp)} µm.`,
        `pixels x ${grouped(rect[0])}, y ${grouped(rect[1])}, ${grouped(rect[2])} × ${grouped(rect[3])} at full resolution`);
    }

    // -- drawing a region, measuring a line --------------------------------------------------------------
    setMode(mode) {
      this.mode = mode;
      this.root.classList.toggle("cxp-drawing", mode === "region");
      this.root.classList.toggle("cxp-measuring", mode === "measure");
      this.root.querySelector(".cxp-draw").textContent = mode === "region" ? "Drag over the slide… (Esc cancels)" : "Draw a region";
      this.root.querySelector(".cxp-measure").textContent = mode === "measure" ? "Drag a line… (Esc cancels)"
        : this.measurement ? "Clear the line" : "Measure";
      this.drag = null;
      this.draw();
    }

    onPress(event) {
      if (!this.mode) return;
      this.drag = {start: this.toImage(event.position), rect: null, line: null};
    }

    onDrag(event) {
      if (!this.mode || !this.drag) return;
      event.preventDefaultAction = true;  // no panning while drawing
      const [x, y] = this.toImage(event.position), [sx, sy] = this.drag.start;
      if (this.mode === "measure") this.drag.line = [[sx, sy], [x, y]];
      else this.drag.rect = [Math.min(x, sx), Math.min(y, sy), Math.abs(x - sx), Math.abs(y - sy)];
      this.draw();
    }

    onRelease() {
      if (!this.mode || !this.drag) return;
      const {rect, line} = this.drag;
      const mode = this.mode;
      if (mode === "measure" && line) this.measurement = line;
      this.setMode(null);
      if (mode === "measure" && line) this.root.dataset.measured = this.lineMicrons(line).toFixed(2);
      if (mode === "region" && rect && rect[2] >= 1 && rect[3] >= 1) this.choose(rect);
    }

    useCurrentView() {
      if (!this.viewer || !this.image()) return;
      // The bounding box of the view in level-0 pixels (the view may be rotated).
      const c = this.viewer.container, P = OpenSeadragon.Point;
      const points = [[0, 0], [c.clientWidth, 0], [c.clientWidth, c.clientHeight], [0, c.clientHeight]]
        .map(([x, y]) => this.toImage(new P(x, y)));
      const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
      const x0 = Math.min(...xs), y0 = Math.min(...ys);
      this.choose([x0, y0, Math.max(...xs) - x0, Math.max(...ys) - y0]);
      const box = document.querySelector("#question textarea");
      if (box) box.focus({preventScroll: true});
    }

    choose(rect) {
      // Whole level-0 pixels inside the slide; the server checks again.
      const x0 = Math.max(0, Math.floor(rect[0])), y0 = Math.max(0, Math.floor(rect[1]));
      const x1 = Math.min(this.config.width, Math.ceil(rect[0] + rect[2]));
      const y1 = Math.min(this.config.height, Math.ceil(rect[1] + rect[3]));
      if (x1 <= x0 || y1 <= y0) return;
      const region = [x0, y0, x1 - x0, y1 - y0];
      this.config.region = region;
      this.draw();
      this.root.dataset.region = regionText(region);
      this.trigger("select", {region});
    }

    // -- rotation, reset, full page ---------------------------------------------------------------------
    rotate(degrees) {
      if (!this.viewer) return;
      const viewport = this.viewer.viewport;
      viewport.setRotation(viewport.getRotation() + degrees);
      viewport.applyConstraints();
    }

    resetView() {
      if (this.viewer) this.viewer.viewport.goHome();  // the "home" handler also sets the rotation back to 0
    }

    setFullPage(on) {
      document.body.classList.toggle("cxp-fullpage", on);
      this.root.querySelector(".cxp-fullpage").textContent = on ? "Leave full page" : "Full page";
      const screen = document.documentElement;
      try {  // the screen too where the browser allows it; the page's own full-page layout either way
        if (on && !document.fullscreenElement && screen.requestFullscreen) screen.requestFullscreen().catch(() => {});
        if (!on && document.fullscreenElement && document.exitFullscreen) document.exitFullscreen().catch(() => {});
      } catch (error) { /* no fullscreen API: the layout alone */ }
      window.dispatchEvent(new Event("resize"));
    }

    toggleHelp(open) {
      const show = open === undefined ? this.help.hidden : open;
      this.help.hidden = !show;
      this.root.querySelector(".cxp-help-button").setAttribute("aria-expanded", String(show));
    }

    // -- flights ----------------------------------------------------------------------------------------
    flyTo(rect) {
      const item = this.image();
      if (!item) { this.pendingFlight = rect; return; }
      const margin = Math.max(rect[2], rect[3]) * 1.5;
      const target = item.imageToViewportRectangle(rect[0] - margin, rect[1] - margin, rect[2] + 2 * margin,
        rect[3] + 2 * margin);
      this.root.dataset.highlight = regionText(rect);
      // A patch goes to the panel (the panel always shows what was last pointed at); a region is marked.
      const o = this.overlay;
      const index = o ? Array.from(o.x).findIndex((x, i) => x === rect[0] && o.y[i] === rect[1] && o.side === rect[2]
        && o.side === rect[3]) : -1;
      if (index >= 0) this.showPatch(index);
      else { this.highlight = rect; this.showRegion(rect); }
      this.viewer.viewport.fitBounds(target);
      this.draw();
    }

    // -- the view as a picture -------------------------------------------------------------------------
    exportView() {
      const t = this.viewer && this.config && this.transform();
      if (!t) return null;
      this.draw();
      const tiles = this.viewer.drawer.canvas, ratio = tiles.width / this.viewer.container.clientWidth;
      const width = tiles.width, height = tiles.height, footer = Math.round(30 * ratio);
      const out = element("canvas");
      out.width = width;
      out.height = height + footer;
      const ctx = out.getContext("2d");
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(0, 0, out.width, out.height);
      ctx.drawImage(tiles, 0, 0);
      ctx.drawImage(this.canvas, 0, 0, width, height);
      // The scale bar, as on screen: black on a white plate, bottom left.
      const umPerPx = this.umPerScreenPixel(t) / ratio;
      const microns = niceLength(umPerPx * SCALEBAR_TARGET_PX * ratio);
      const bar = Math.round(microns / umPerPx), pad = Math.round(8 * ratio), thick = Math.round(6 * ratio);
      const plate = {x: pad, y: height - pad - thick - Math.round(22 * ratio), w: bar + 2 * pad, h: thick + Math.round(22 * ratio) + pad};
      ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
      ctx.fillRect(plate.x, plate.y, plate.w, plate.h);
      const barBox = {x: plate.x + pad, y: height - pad - thick, w: bar, h: thick};
      ctx.fillStyle = "#000000";
      ctx.fillRect(barBox.x, barBox.y, barBox.w, barBox.h);
      ctx.font = `600 ${Math.round(13 * ratio)}px system-ui, sans-serif`;
      ctx.fillText(fmtLength(microns), barBox.x, barBox.y - Math.round(5 * ratio));
      // The footer: which slide, how magnified, what the colours are.
      const magnification = 10 / this.umPerScreenPixel(t);
      const legend = this.showHeat ? ` · attention ${this.scale === "rank" ? "by rank" : "by weight (share)"}, ` +
        `opacity ${Math.round(this.opacity * 100)} %` : "";
      ctx.fillStyle = "#111827";
      ctx.fillText(`${this.config.name} · ≈ ${magnification.toFixed(magnification >= 10 ? 0 : 1)}× · rotated ` +
        `${Math.round(this.rotation())}°${legend} · ChatEXAONEPath, ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC`,
        pad, height + Math.round(20 * ratio));
      this.root.dataset.exportBar = JSON.stringify({...barBox, microns, umPerPx});
      const stem = (this.config.name || "slide").replace(/\.[^.]+$/, "").replace(/[^\w.-]+/g, "_");
      out.toBlob((blob) => {
        const link = element("a");
        link.href = URL.createObjectURL(blob);
        link.download = `${stem}-view.png`;
        document.body.appendChild(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(link.href), 10000);
      }, "image/png");
      return out;
    }
  }

  const viewers = [];

  // Chips in the chat (evidence, a region's header) fly the viewer there. They are plain links, because the
  // chat's sanitiser keeps an href but drops data attributes: "#cxp-region=x,y,w,h", and in a case
  // "#cxp-region=x,y,w,h@N": slide N (from 1), which the server puts on show first (the case strip's event).
  const CHIP = 'a[href^="#cxp-region="]';
  document.addEventListener("click", (event) => {
    const chip = event.target.closest && event.target.closest(CHIP);
    if (!chip) return;
    event.preventDefault();
    event.stopPropagation();
    const [place, slide] = chip.getAttribute("href").slice("#cxp-region=".length).split("@");
    const rect = place.split(",").map(Number);
    if (rect.length !== 4 || !rect.every(Number.isFinite)) return;
    const viewer = viewers.find((v) => v.viewer);
    const index = slide === undefined ? null : Number(slide) - 1;
    const shown = viewer && viewer.config ? (viewer.config.slide || 0) : null;
    if (index !== null && Number.isInteger(index) && index !== shown && window.CXPCase) window.CXPCase.show(index, rect);
    else if (viewer) viewer.flyTo(rect);
  }, true);

  window.CXPViewer = {
    viewers,
    format: {fmtLength, fmtArea, fmtShare, niceLength},
    mount(element, props, trigger, watch) {
      const viewer = new SlideViewer(element, trigger);
      viewers.push(viewer);
      element.__cxp = viewer;
      const update = () => viewer.show(props.value).catch((error) => {
        console.error("slide viewer:", error);
        viewer.empty.hidden = false;
        viewer.empty.textContent = "The slide viewer could not open this slide; the Thumbnail tab still shows it.";
      });
      update();
      watch("value", update);
    },
  };
})();
