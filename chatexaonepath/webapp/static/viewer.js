/* The slide viewer of the ChatEXAONEPath app: OpenSeadragon over the session's deep-zoom tiles, with the
 * attention overlay and tissue outline drawn in level-0 coordinates, click-to-inspect, region drawing, and
 * flights to evidence. The page's gr.HTML component calls CXPViewer.mount(element, props, trigger, watch);
 * its value is the config the server publishes (viewer.py). Nothing here is fetched from outside the app.
 */
(function () {
  "use strict";

  // Viridis at 9 stops (matplotlib's), interpolated: the same perceptual map as the static heatmap.
  const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  const BUCKETS = 64;
  const COLOURS = Array.from({length: BUCKETS}, (_, i) => colourAt(i / (BUCKETS - 1)));

  function colourAt(unit) {
    const scaled = Math.min(Math.max(unit, 0), 1) * (VIRIDIS.length - 1);
    const low = Math.floor(scaled), high = Math.min(low + 1, VIRIDIS.length - 1), t = scaled - low;
    const mix = VIRIDIS[low].map((c, k) => Math.round(c + (VIRIDIS[high][k] - c) * t));
    return `rgb(${mix[0]}, ${mix[1]}, ${mix[2]})`;
  }

  function regionText(r) { return `${r[0]},${r[1]},${r[2]},${r[3]}`; }

  class SlideViewer {
    constructor(root, trigger) {
      this.root = root;
      this.trigger = trigger;
      this.host = root.querySelector(".cxp-osd");
      this.empty = root.querySelector(".cxp-empty");
      this.inspect = root.querySelector(".cxp-inspect");
      this.canvas = document.createElement("canvas");
      this.canvas.className = "cxp-overlay";
      this.config = null;
      this.overlay = null;
      this.viewer = null;
      this.highlight = null;  // [x, y, w, h] of the place last flown to
      this.selected = null;  // index of the patch last inspected
      this.drawing = false;
      this.drag = null;
      this.lastGoto = null;
      this.tilesLoaded = 0;
      this.showHeat = true;
      this.showOutline = true;
      this.opacity = 0.45;
      this.wireToolbar();
    }

    wireToolbar() {
      const q = (selector) => this.root.querySelector(selector);
      q(".cxp-heat").addEventListener("change", (e) => { this.showHeat = e.target.checked; this.draw(); });
      q(".cxp-outline").addEventListener("change", (e) => { this.showOutline = e.target.checked; this.draw(); });
      q(".cxp-opacity").addEventListener("input", (e) => { this.opacity = Number(e.target.value); this.draw(); });
      q(".cxp-draw").addEventListener("click", () => this.setDrawing(!this.drawing));
      q(".cxp-view").addEventListener("click", () => this.useCurrentView());
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
        navigatorPosition: "BOTTOM_RIGHT", showRotationControl: false, maxZoomPixelRatio: 4,
        visibilityRatio: 0.3, gestureSettingsMouse: {clickToZoom: false, dblClickToZoom: true},
        animationTime: 0.6, imageLoaderLimit: 6,
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
      viewer.addHandler("animation-finish", () => { this.root.dataset.settled = String(Date.now()); });
      viewer.addHandler("canvas-click", (e) => this.onClick(e));
      viewer.addHandler("canvas-press", (e) => this.onPress(e));
      viewer.addHandler("canvas-drag", (e) => this.onDrag(e));
      viewer.addHandler("canvas-release", (e) => this.onRelease(e));
      const response = await fetch(`${this.base}overlay.json`, {credentials: "same-origin"});
      if (!response.ok) throw new Error(`overlay: HTTP ${response.status}`);
      this.setOverlay(await response.json());
    }

    setOverlay(data) {
      const n = data.x.length;
      this.overlay = {
        side: data.patch_side, n, x: Int32Array.from(data.x), y: Int32Array.from(data.y),
        weight: Float64Array.from(data.weight), rank: Int32Array.from(data.rank), tissue: data.tissue,
        top: data.top, map: data.map,
      };
      this.root.querySelector(".cxp-legend-name").textContent = `rank of the ${data.map}, ${n} patches`;
      this.root.dataset.patches = String(n);
      this.draw();
    }

    close() {
      if (this.viewer) this.viewer.destroy();
      if (this.cookiePath) document.cookie = `cxp_viewer=; path=${this.cookiePath}; max-age=0`;
      this.viewer = this.config = this.overlay = this.highlight = this.selected = this.pendingFlight = null;
      this.tilesLoaded = 0;
      this.inspect.hidden = true;
      this.empty.hidden = false;
      delete this.root.dataset.open;
      delete this.root.dataset.token;
    }

    // -- geometry: level-0 pixels ↔ pixels of the viewer element ----------------------------------------
    image() { return this.viewer && this.viewer.world.getItemAt(0); }

    transform() {
      // The mapping is affine (no rotation): two points give scale and offset exactly.
      const item = this.image();
      if (!item) return null;
      const origin = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
      const far = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(this.config.width, this.config.height));
      return {x: origin.x, y: origin.y, sx: (far.x - origin.x) / this.config.width,
        sy: (far.y - origin.y) / this.config.height};
    }

    toScreen(t, x, y) { return [Math.round(t.x + x * t.sx), Math.round(t.y + y * t.sy)]; }

    toImage(position) {
      const point = this.image().viewerElementToImageCoordinates(position);
      return [point.x, point.y];
    }

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
      if (this.overlay && this.showHeat && this.opacity > 0) this.drawHeat(ctx, t, width, height);
      if (this.overlay && this.showOutline) this.drawOutline(ctx, t);
      if (this.config.region) this.drawBox(ctx, t, this.config.region, "#facc15", [6, 4]);
      if (this.drag && this.drag.rect) this.drawBox(ctx, t, this.drag.rect, "#facc15", [2, 3]);
      if (this.highlight) this.drawBox(ctx, t, this.highlight, "#ec4899", []);
      if (this.selected !== null && this.overlay) {
        const o = this.overlay, i = this.selected;
        this.drawBox(ctx, t, [o.x[i], o.y[i], o.side, o.side], "#ffffff", []);
      }
      this.root.dataset.drawn = String(Date.now());
    }

    drawHeat(ctx, t, width, height) {
      const o = this.overlay;
      const [minX, minY] = [(-t.x) / t.sx - o.side, (-t.y) / t.sy - o.side];
      const [maxX, maxY] = [(width - t.x) / t.sx, (height - t.y) / t.sy];
      const paths = Array.from({length: BUCKETS}, () => new Path2D());
      const last = Math.max(o.n - 1, 1);
      for (let i = 0; i < o.n; i++) {
        const x = o.x[i], y = o.y[i];
        if (x < minX || x > maxX || y < minY || y > maxY) continue;
        const [x0, y0] = this.toScreen(t, x, y), [x1, y1] = this.toScreen(t, x + o.side, y + o.side);
        const unit = (o.n - o.rank[i]) / last;  // by rank, as the static heatmap: a few peaks do not flatten the rest
        paths[Math.min(BUCKETS - 1, Math.floor(unit * BUCKETS))].rect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0));
      }
      ctx.globalAlpha = this.opacity;
      paths.forEach((path, bucket) => { ctx.fillStyle = COLOURS[bucket]; ctx.fill(path); });
      ctx.globalAlpha = 1;
    }

    drawOutline(ctx, t) {
      ctx.lineWidth = 2;
      for (const ring of this.overlay.tissue) {
        const p = ring.points;
        if (p.length < 4) continue;
        ctx.strokeStyle = ring.hole ? "#1e5adc" : "#00a03c";
        ctx.beginPath();
        ctx.moveTo(t.x + p[0] * t.sx, t.y + p[1] * t.sy);
        for (let k = 2; k < p.length; k += 2) ctx.lineTo(t.x + p[k] * t.sx, t.y + p[k + 1] * t.sy);
        ctx.closePath();
        ctx.stroke();
      }
    }

    drawBox(ctx, t, rect, colour, dash) {
      const [x0, y0] = this.toScreen(t, rect[0], rect[1]), [x1, y1] = this.toScreen(t, rect[0] + rect[2], rect[1] + rect[3]);
      ctx.save();
      ctx.setLineDash(dash);
      ctx.lineWidth = 3;
      ctx.strokeStyle = "rgba(0, 0, 0, 0.6)";
      ctx.strokeRect(x0 - 1.5, y0 - 1.5, x1 - x0 + 3, y1 - y0 + 3);
      ctx.lineWidth = 2;
      ctx.strokeStyle = colour;
      ctx.strokeRect(x0 - 1, y0 - 1, x1 - x0 + 2, y1 - y0 + 2);
      ctx.restore();
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
      if (this.drawing || !event.quick || !this.overlay) return;
      const [x, y] = this.toImage(event.position);
      const index = this.patchAt(x, y);
      this.selected = index;
      this.draw();
      if (index === null) {
        this.inspect.hidden = false;
        this.inspect.innerHTML = `<p>No patch here (level-0 ${Math.round(x)}, ${Math.round(y)}): only tissue ` +
          `patches were given to the model.</p>`;
        return;
      }
      const o = this.overlay;
      this.inspect.hidden = false;
      this.inspect.dataset.index = String(index);
      this.inspect.innerHTML = "";
      const img = document.createElement("img");
      img.src = `${this.base}patch/${index}.jpeg`;
      img.alt = "patch at full resolution";
      const text = document.createElement("div");
      text.className = "cxp-inspect-text";
      text.textContent = `Patch ranked ${o.rank[index]} of ${o.n} by ${o.map} · ${o.map} ${o.weight[index].toPrecision(4)}` +
        ` · level-0 (${o.x[index]}, ${o.y[index]}), ${o.side} × ${o.side} px`;
      this.inspect.append(img, text);
    }

    // -- drawing a region ------------------------------------------------------------------------------
    setDrawing(on) {
      this.drawing = on;
      this.root.classList.toggle("cxp-drawing", on);
      this.root.querySelector(".cxp-draw").textContent = on ? "Drag over the slide… (click to cancel)" : "Draw a region";
      this.drag = null;
      this.draw();
    }

    onPress(event) {
      if (!this.drawing) return;
      this.drag = {start: this.toImage(event.position), rect: null};
    }

    onDrag(event) {
      if (!this.drawing || !this.drag) return;
      event.preventDefaultAction = true;  // no panning while drawing
      const [x, y] = this.toImage(event.position), [sx, sy] = this.drag.start;
      this.drag.rect = [Math.min(x, sx), Math.min(y, sy), Math.abs(x - sx), Math.abs(y - sy)];
      this.draw();
    }

    onRelease() {
      if (!this.drawing || !this.drag) return;
      const rect = this.drag.rect;
      this.setDrawing(false);
      if (rect && rect[2] >= 1 && rect[3] >= 1) this.choose(rect);
    }

    useCurrentView() {
      if (!this.viewer || !this.image()) return;
      const bounds = this.image().viewportToImageRectangle(this.viewer.viewport.getBounds(true));
      this.choose([bounds.x, bounds.y, bounds.width, bounds.height]);
      const box = document.querySelector("#question textarea");
      if (box) box.focus();
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

    // -- flights ----------------------------------------------------------------------------------------
    flyTo(rect) {
      const item = this.image();
      if (!item) { this.pendingFlight = rect; return; }
      const margin = Math.max(rect[2], rect[3]) * 1.5;
      const target = item.imageToViewportRectangle(rect[0] - margin, rect[1] - margin, rect[2] + 2 * margin,
        rect[3] + 2 * margin);
      this.highlight = rect;
      this.root.dataset.highlight = regionText(rect);
      this.viewer.viewport.fitBounds(target);
      this.root.scrollIntoView({block: "nearest", behavior: "smooth"});
      this.draw();
    }
  }

  const viewers = [];

  // Chips in the chat (evidence, a region's header) fly the viewer there. They are plain links, because the
  // chat's sanitiser keeps an href but drops data attributes: "#cxp-region=x,y,w,h".
  const CHIP = 'a[href^="#cxp-region="]';
  document.addEventListener("click", (event) => {
    const chip = event.target.closest && event.target.closest(CHIP);
    if (!chip) return;
    event.preventDefault();
    event.stopPropagation();
    const rect = chip.getAttribute("href").slice("#cxp-region=".length).split(",").map(Number);
    const viewer = viewers.find((v) => v.viewer);
    if (viewer && rect.length === 4 && rect.every(Number.isFinite)) viewer.flyTo(rect);
  }, true);

  window.CXPViewer = {
    viewers,
    mount(element, props, trigger, watch) {
      const viewer = new SlideViewer(element, trigger);
      viewers.push(viewer);
      element.__cxp = viewer;
      const update = () => viewer.show(props.value).catch((error) => {
        console.error("slide viewer:", error);
        viewer.empty.hidden = false;
        viewer.empty.textContent = "The slide viewer could not open this slide; the thumbnail below still shows it.";
      });
      update();
      watch("value", update);
    },
  };
})();
