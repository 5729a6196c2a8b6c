export default {
  render({ model, el }) {
    el.classList.add("vs-x");
    const mk = (cls, text) => { const d = document.createElement("div"); d.className = cls; if (text) d.textContent = text; return d; };
    const drop = mk("vs-drop", "Drop an image file here (or click to choose one) to search with it");
    const input = document.createElement("input");
    input.type = "file"; input.accept = "image/*"; input.hidden = true;
    const gallery = mk("vs-gallery"), panel = mk("vs-panel"), box = mk("vs-lightbox-live");
    const mapbox = document.createElement("details"), map = mk("vs-map"), tip = mk("vs-tip");
    mapbox.className = "vs-mapbox"; mapbox.open = true;
    mapbox.innerHTML = "<summary>Embedding map</summary>";
    mapbox.append(map);
    box.hidden = true; tip.hidden = true;
    el.append(drop, input, gallery, mapbox, panel, box);
    const thumbs = {};
    let tipId = "";
    const drawTip = () => {
      const uri = thumbs[tipId];
      const img = tip.querySelector("img");
      if (uri && img) img.src = uri;
    };
    const mark = () => {
      const sel = model.get("selected");
      for (const t of gallery.querySelectorAll(".vs-thumb")) t.classList.toggle("vs-selected", t.dataset.id === sel);
    };
    const pick = (id) => { if (id) { model.set("selected", id); model.save_changes(); } };
    const upload = async (f) => {
      if (!f) return;
      drop.textContent = "reading " + f.name + " ...";
      const buf = await f.arrayBuffer();
      model.send({ type: "upload", name: f.name }, undefined, [buf]);
      drop.textContent = "Drop an image file here (or click to choose one) to search with it";
    };
    gallery.addEventListener("click", (e) => { const t = e.target.closest(".vs-thumb"); if (t) pick(t.dataset.id); });
    panel.addEventListener("click", (e) => {
      const z = e.target.closest(".vs-zoom");
      if (z) { e.preventDefault(); model.send({ type: "enlarge", id: z.dataset.id }); return; }
      const h = e.target.closest(".vs-hit");
      if (h) { e.preventDefault(); pick(h.dataset.id); }
    });
    box.addEventListener("click", () => { box.hidden = true; });
    map.addEventListener("click", (e) => { const p = e.target.closest(".vs-pt"); if (p) pick(p.dataset.id); });
    map.addEventListener("mouseover", (e) => {
      const p = e.target.closest(".vs-pt");
      if (!p) return;
      tipId = p.dataset.id;
      tip.innerHTML = "<img alt=''><div><b></b></div><div></div>";
      tip.querySelector("b").textContent = p.dataset.label;
      tip.querySelectorAll("div")[1].textContent = tipId.split("/").pop();
      const r = map.getBoundingClientRect(), q = p.getBoundingClientRect();
      tip.style.left = (q.right - r.left + map.scrollLeft + 8) + "px";
      tip.style.top = Math.max(0, q.top - r.top - 40) + "px";
      tip.hidden = false;
      if (tipId in thumbs) drawTip(); else model.send({ type: "thumb", id: tipId });
    });
    map.addEventListener("mouseout", (e) => { if (e.target.closest(".vs-pt")) tip.hidden = true; });
    drop.addEventListener("click", () => input.click());
    input.addEventListener("change", () => { upload(input.files[0]); input.value = ""; });
    for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("vs-over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("vs-over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault(); e.stopPropagation(); drop.classList.remove("vs-over");
      upload(e.dataTransfer && e.dataTransfer.files[0]);
    });
    model.on("msg:custom", (msg) => {
      if (msg.type === "thumb") { thumbs[msg.id] = msg.uri; if (msg.id === tipId) drawTip(); return; }
      if (msg.type !== "enlarged") return;
      box.innerHTML = "<figure><img><figcaption></figcaption></figure>";
      box.querySelector("img").src = msg.uri;
      box.querySelector("figcaption").textContent = msg.caption;
      box.hidden = false;
    });
    const drawGallery = () => { gallery.innerHTML = model.get("gallery_html"); mark(); };
    const drawPanel = () => { panel.innerHTML = model.get("panel_html"); };
    const drawMap = () => {
      map.innerHTML = model.get("map_html"); map.append(tip); tip.hidden = true;
      mapbox.hidden = !model.get("map_html");
    };
    model.on("change:map_html", drawMap);
    model.on("change:gallery_html", drawGallery);
    model.on("change:selected", mark);
    model.on("change:panel_html", drawPanel);
    drawGallery(); drawPanel(); drawMap();
  }
};
