// The hdn book: a display equation wider than its column is set in a smaller size, down to 70 %,
// instead of scrolling sideways (MathJax 3 does not break lines). Runs once MathJax has typeset
// the page, and again when the window's width changes. make book-check checks the result.
(function () {
  const MIN_SCALE = 0.7;

  function fit() {
    for (const eq of document.querySelectorAll('.bd-article mjx-container[display="true"]')) {
      eq.style.fontSize = "";
      const box = eq.clientWidth;
      const wide = eq.scrollWidth;
      if (box > 0 && wide > box + 1) {
        eq.style.fontSize = `${Math.max(MIN_SCALE, (box - 2) / wide) * 100}%`;
      }
    }
  }

  function whenTypeset() {
    const startup = window.MathJax && window.MathJax.startup;
    if (startup && startup.promise) startup.promise.then(fit);
  }

  let timer = null;
  window.addEventListener("resize", () => {
    clearTimeout(timer);
    timer = setTimeout(fit, 150);
  });
  if (document.readyState === "complete") whenTypeset();
  else window.addEventListener("load", whenTypeset);
})();
