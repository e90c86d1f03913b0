/* Page-level behaviour of the ChatEXAONEPath app that needs no server round trip:
 * - the slide and the chat panel fill the window's height below the header (so the viewer is as large as the
 *   window allows, and the page never has to scroll to reach it), refitted whenever the header changes
 *   (the model card folding, the banner expanding) or the window is resized;
 * - the demo warning is one line; a click (or Enter) shows all of it;
 * - the model card (a fold-out of the title line) opens on this browser's first visit, and folds once a slide is
 *   ready (ui.py's FOCUS_QUESTION_JS) or when it is clicked;
 * - "Save conversation" downloads the conversation, with each answer's evidence, as Markdown from the
 *   session's own route (viewer/s/<token>/conversation.md, which only this session's key opens).
 */
(function () {
  "use strict";

  const MIN_MAIN = 420;  // below this the panels stop shrinking and the page scrolls instead
  const SEEN = "chatexaonepath-model-card-seen";

  function firstView() {
    const card = document.getElementById("model-card");
    if (!card) return;
    try {
      if (!window.localStorage.getItem(SEEN)) {
        card.open = true;
        window.localStorage.setItem(SEEN, "1");
      }
    } catch (error) { /* no storage (a private window's policy): the card stays folded */ }
  }

  function fit() {
    const main = document.getElementById("cxp-main");
    if (!main) return;
    const top = main.getBoundingClientRect().top + window.scrollY;
    const full = document.body.classList.contains("cxp-fullpage");
    const height = full ? window.innerHeight : Math.max(MIN_MAIN, window.innerHeight - top - 8);
    document.documentElement.style.setProperty("--cxp-main-h", `${Math.floor(height)}px`);
  }

  function watchLayout() {
    const main = document.getElementById("cxp-main");
    if (!main) { setTimeout(watchLayout, 100); return; }  // Gradio renders the page after this script runs
    const observer = new ResizeObserver(fit);
    for (const id of ["cxp-top"]) {
      const node = document.getElementById(id);
      if (node) observer.observe(node);
    }
    window.addEventListener("resize", fit);
    firstView();
    fit();
  }

  // The empty chat shows the slide's name and the example questions; Gradio scrolls a chat to its end, which
  // would hide the name above the examples.
  function keepPlaceholderInView() {
    const chat = document.getElementById("chat");
    if (!chat) { setTimeout(keepPlaceholderInView, 200); return; }
    const top = () => {
      const placeholder = chat.querySelector(".placeholder-content");
      const scroller = placeholder && placeholder.closest(".bubble-wrap");
      if (scroller) scroller.scrollTop = 0;
    };
    new MutationObserver(() => requestAnimationFrame(top)).observe(chat, {childList: true, subtree: true, characterData: true});
    top();
  }

  function toggleBanner(event) {
    const banner = event.target.closest && event.target.closest("#banner");
    if (!banner || (event.type === "keydown" && event.key !== "Enter" && event.key !== " ")) return;
    banner.classList.toggle("cxp-expanded");
    fit();
  }

  async function saveConversation(button) {
    const viewer = (window.CXPViewer && window.CXPViewer.viewers.find((v) => v.config)) || null;
    if (!viewer) {
      button.title = "Load a slide and ask about it first.";
      button.classList.add("cxp-refused");
      setTimeout(() => button.classList.remove("cxp-refused"), 1200);
      return;
    }
    const response = await fetch(`${viewer.base}conversation.md`, {credentials: "same-origin"});
    if (!response.ok) return;
    const stem = (viewer.config.name || "slide").replace(/\.[^.]+$/, "").replace(/[^\w.-]+/g, "_");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `${stem}-conversation.md`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  document.addEventListener("click", (event) => {
    toggleBanner(event);
    const button = event.target.closest && event.target.closest("#export-chat");
    if (button) saveConversation(button);
  });
  document.addEventListener("keydown", toggleBanner);
  window.CXPPage = {fit};
  const start = () => { watchLayout(); keepPlaceholderInView(); };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
