/* WriteSAE book: glue for the ipywidgets snapshots on static pages. Loaded before the vendored embed
   manager (_config.yml, sphinx.config.nb_ipywidgets_js). It
   1. points the embed manager at its own folder for the files it fetches (the Font Awesome fonts),
      which it otherwise looks for under <page folder>/@jupyter-widgets/html-manager/dist/ (the URL
      require.js gives its module): a require.js configuration set before require.js loads, and the
      manager's own override;
   2. gives MathJax 3 the one MathJax 2 call the embed manager makes to typeset widget text
      (MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])); without it every widget label throws
      "Cannot read properties of undefined (reading 'Queue')";
   3. shows the snapshot notice that writesae.widgets puts, hidden, at the top of each widget: on this
      page the widgets keep the state the book was executed with and nothing recomputes. */
(function () {
  var assets = new URL("vendor/html-manager/", document.currentScript.src).href;
  window.require = {paths: {"@jupyter-widgets/html-manager/dist": assets.slice(0, -1)}};
  window.__jupyter_widgets_assets_path__ = assets;

  var style = document.createElement("style");
  style.textContent = ".writesae-snapshot { display: block !important; }";
  document.head.appendChild(style);

  // MathJax (deferred) has run by DOMContentLoaded; the embed manager renders on "load", after it.
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub) return;
    mj.Hub = {
      Queue: function () {
        Array.prototype.forEach.call(arguments, function (job) {
          if (Array.isArray(job) && job[0] === "Typeset" && job[2] && mj.startup && mj.startup.promise) {
            mj.startup.promise.then(function () { return mj.typesetPromise([job[2]]); });
          }
        });
      }
    };
  });
})();
