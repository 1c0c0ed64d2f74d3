// MathJax configuration for `pymdownx.arithmatex` in generic mode: typeset only the
// `arithmatex` spans and blocks.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Material emits `document$` on every page load (and on each page change when instant
// navigation is on). Typeset whatever new maths the page holds once MathJax's own
// start-up typesetting is done. Clearing MathJax's caches here, as is sometimes
// suggested, would drop the CSS that draws the glyphs of maths already on the page.
document$.subscribe(() => {
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    MathJax.startup.promise = MathJax.startup.promise.then(() =>
      MathJax.typesetPromise(),
    );
  }
});
