"""Training curves of an SAE run (the rows ``writesae.train`` logs to ``train_log.jsonl``)."""
from __future__ import annotations

from pathlib import Path

from . import panels

__all__ = ["training_curves"]

PANELS = (("loss", "training loss", True), ("fvu", "FVU", True), ("l0", "L0 (active atoms)", False),
          ("dead", "dead fraction", False))


def _rows(log):
    from ..train import LOG_FILE, read_log

    if hasattr(log, "log"):  # a TrainResult
        return log.log
    if getattr(log, "path", None) is not None:  # a WriteSAE loaded from <run>/best
        log = log.path
    if isinstance(log, (str, Path)):
        path = Path(log)
        if not (path / LOG_FILE).exists() and (path.parent / LOG_FILE).exists():  # <run>/best -> <run>
            path = path.parent
        return read_log(path)
    return list(log)


def training_curves(log, title=None):
    """Loss, FVU, L0 and dead fraction against the step, from a run's log: a :class:`TrainResult`, its
    ``out_dir`` (``train_log.jsonl`` inside), a WriteSAE loaded from ``out_dir/best`` (every SAE of
    ``writesae.pipeline.sae``), or the rows of :func:`writesae.train.read_log`. Training rows
    (each on one batch) are lines; validation rows are dots on the same panels."""
    rows = _rows(log)
    if not rows:
        raise ValueError("the training log is empty: train with an out_dir (the trainer writes train_log.jsonl there; "
                         "SAEs trained before it logged have none: delete their artifact folder to retrain) or pass "
                         "TrainResult.log")
    fig, axes = panels(len(PANELS), max_cols=2, panel_width=4.0, panel_height=2.5)
    for ax, (key, label, logy) in zip(axes, PANELS):
        for split, style in (("train", dict(lw=1.2, color="tab:blue")),
                             ("val", dict(ls="none", marker="o", ms=3, color="tab:orange"))):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
            if pts:
                ax.plot(*zip(*pts), label=split, **style)
        ax.set(xlabel="step", title=label, yscale="log" if logy else "linear")
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig
