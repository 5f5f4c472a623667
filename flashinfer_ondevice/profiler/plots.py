"""The profile as pictures (matplotlib, the optional `[plot]` extra): decode speed against the
budget per setting with the peers, bytes read per token against the budget, the
speed/perplexity frontier (one point per setting at a budget, peers included), and one run's
memory over time against its limit.
"""

from __future__ import annotations

from pathlib import Path

PLOTS = ("speed.png", "bytes.png", "frontier.png", "memory.png")
INSTALL_HINT = "plots need matplotlib: pip install 'flashinfer-ondevice[plot]'"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _label(cell: dict) -> str:
    if cell["system"] == "ours":
        return f"ours: {cell['setting']}"
    return f"llama.cpp: {Path(cell['model']).name}"


def _series(result: dict, key: str) -> dict[str, list[tuple[float, float]]]:
    """label -> [(budget MB, value)] of the cells that ran and have a budget."""
    series: dict[str, list[tuple[float, float]]] = {}
    for cell in result["cells"]:
        if cell["status"] == "ok" and cell["budget_bytes"] is not None:
            series.setdefault(_label(cell), []).append((cell["budget_bytes"] / 1e6,
                                                        cell[key]))
    return series


def _label_points(ax, points: list[tuple[float, float, str, bool]]) -> None:
    """Label each point to its right; among points close in x, labels are kept at least a
    line apart (moved down where needed) so none is drawn over another."""
    ax.autoscale_view()
    to_display = ax.transData.transform
    per_point = 72 / ax.figure.dpi  # display pixels -> points
    xs = [p[0] for p in points]
    x_span = (max(xs) - min(xs)) or 1.0
    placed: list[tuple[float, float]] = []  # (x, label's display y)
    for x, y, label, _ in sorted(points, key=lambda p: -p[1]):
        _, y_display = to_display((x, y))
        below = [ly for px, ly in placed if abs(px - x) < 0.15 * x_span]
        label_y = min([y_display] + [ly - 11 / per_point for ly in below])
        placed.append((x, label_y))
        ax.annotate(label, (x, y), fontsize=7, textcoords="offset points",
                    xytext=(6, (label_y - y_display) * per_point - 3))


def write(result: dict, folder: Path) -> list[Path]:
    """Write the PNGs into `folder`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(folder / name)

    model = Path(result["model"]).name
    for key, scale, ylabel, title, file in (
            ("decode_tps", 1.0, "decode tokens per second", "Decode speed", PLOTS[0]),
            ("bytes_per_token", 1e6, "MB read from storage per token", "Storage reads",
             PLOTS[1])):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in sorted(_series(result, key).items()):
            points.sort()
            style = "-o" if label.startswith("ours") else "--s"
            ax.plot([p[0] for p in points], [p[1] / scale for p in points], style, label=label)
        ax.set_xlabel("memory budget above baseline (MB)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} against the budget: {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, file)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = []  # (perplexity, tok/s, label, ours)
    for cell in result["cells"]:
        if cell["status"] != "ok":
            continue
        quality = result["quality"][cell["quality_key"]]
        ours = cell["system"] == "ours"
        who = cell["setting"] if ours else "llama.cpp" + (
            "" if cell["model"] == result["model"] else f" {Path(cell['model']).name}")
        points.append((quality["perplexity"], cell["decode_tps"], f"{who} @ {cell['budget']}",
                       ours))
    for ours, color, marker, name in ((True, "tab:blue", "o", "ours"),
                                      (False, "tab:orange", "s", "llama.cpp")):
        chosen = [p for p in points if p[3] == ours]
        if chosen:
            ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], color=color,
                       marker=marker, label=name, zorder=3)
    _label_points(ax, points)
    ax.set_xlabel("perplexity on held-out text (lower is better)")
    ax.set_ylabel("decode tokens per second")
    ax.set_title(f"Speed against quality: {model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, PLOTS[2])

    traced = [c for c in result["cells"] if c.get("memory_trace") and c["limit"]
              and c["status"] in ("ok", "oom")]
    if traced:  # ours at the tightest limit that ran (or was killed)
        cell = min(traced, key=lambda c: (c["system"] != "ours", c["limit"]))
        trace = cell["memory_trace"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot([t for t, _, _ in trace], [r / 1e6 for _, r, _ in trace], label="process RSS")
        if any(u is not None for _, _, u in trace):
            ax.plot([t for t, _, u in trace if u is not None],
                    [u / 1e6 for _, _, u in trace if u is not None],
                    label="cgroup usage (page cache included)")
        ax.axhline(cell["limit"] / 1e6, color="tab:red", linestyle="--", label="limit")
        ax.set_xlabel("seconds since the child started")
        ax.set_ylabel("MB")
        ax.set_title(f"Memory of one run: {_label(cell)} at {cell['budget']} "
                     f"({cell['status']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, PLOTS[3])
    return written
