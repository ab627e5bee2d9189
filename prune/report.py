"""What pruning removed: a heat map of heads (and FFN width) kept per layer, and a table.

Works from two `slim.model.Structure`s (dense and pruned), so it can be drawn for any saved model
(`slim.model.read_structure`) without loading weights. Measured figures (parameters, bytes on disk,
latency) are passed in as `metrics` rows, since only the caller has the models.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROWS = (("encoder_heads", "encoder self-attn heads"), ("decoder_heads", "decoder self-attn heads"),
        ("cross_heads", "cross-attn heads"), ("encoder_ffn", "encoder FFN neurons"),
        ("decoder_ffn", "decoder FFN neurons"))
SHORT = {"encoder_heads": "encoder self", "decoder_heads": "decoder self", "cross_heads": "cross",
         "encoder_ffn": "encoder FFN", "decoder_ffn": "decoder FFN"}
PNG_FILE, MD_FILE = "pruning.png", "pruning.md"


def prunable_parameters(structure, d_model: int) -> int:
    """Parameters in the prunable blocks: per head 4·d·head_dim + 2·head_dim (Q/K/V rows, Q and V bias,
    out-proj columns; K has no bias), per FFN neuron 2·d + 1 (fc1 row and bias, fc2 column)."""
    D = structure.head_dim
    heads = structure.num_heads()
    neurons = sum(structure.encoder_ffn) + sum(structure.decoder_ffn)
    return heads * (4 * d_model * D + 2 * D) + neurons * (2 * d_model + 1)


def _heatmap(ax, rows, dense, pruned, title):
    n_layers = max(len(getattr(dense, k)) for k, _ in rows)
    frac = np.full((len(rows), n_layers), np.nan)
    for r, (key, _) in enumerate(rows):
        for i, (d, p) in enumerate(zip(getattr(dense, key), getattr(pruned, key))):
            frac[r, i] = p / d if d else np.nan
            ax.text(i, r, f"{p}/{d}" if d < 100 else f"{p}", ha="center", va="center", fontsize=8,
                    color="black" if p / max(d, 1) > 0.45 else "white")
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(rows)), [SHORT[key] for key, _ in rows])
    ax.set_xticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    ax.set_title(title)
    return im


def pruning_report(dense_structure, pruned_structure, out_dir: str | Path, *, d_model: int | None = None,
                   metrics: dict[str, tuple[float, float]] | None = None) -> dict:
    """Write `pruning.png` (kept per layer and kind) and `pruning.md` into `out_dir`; return the table.

    `d_model` defaults to head_dim x the dense encoder's heads. `metrics` adds measured rows as
    {name: (dense value, pruned value)}, e.g. {"parameters": (37.8e6, 33.1e6), "safetensors MB": ...}.
    """
    dense, pruned = dense_structure, pruned_structure
    for key, _ in ROWS:
        if len(getattr(dense, key)) != len(getattr(pruned, key)):
            raise ValueError(f"pruning_report: {key} has {len(getattr(dense, key))} layers dense, "
                             f"{len(getattr(pruned, key))} pruned")
    d_model = d_model or dense.head_dim * max(dense.encoder_heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_layers = max(len(dense.encoder_heads), len(dense.decoder_heads))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * n_layers + 3), 5), layout="constrained",
                             gridspec_kw={"height_ratios": [3, 2]})
    im = _heatmap(axes[0], ROWS[:3], dense, pruned, "attention heads kept per layer")
    _heatmap(axes[1], ROWS[3:], dense, pruned, "FFN neurons kept per layer")
    fig.colorbar(im, ax=axes, label="fraction kept")
    fig.savefig(out / PNG_FILE, dpi=120)
    plt.close(fig)

    table = {key: {"dense": list(getattr(dense, key)), "pruned": list(getattr(pruned, key))} for key, _ in ROWS}
    totals = {key: (sum(v["dense"]), sum(v["pruned"])) for key, v in table.items()}
    totals["all_heads"] = (dense.num_heads(), pruned.num_heads())
    totals["prunable_parameters"] = (prunable_parameters(dense, d_model), prunable_parameters(pruned, d_model))
    rows = [(label, *totals[key]) for key, label in ROWS]
    rows += [("all heads", *totals["all_heads"]), ("prunable parameters (attention + FFN)",
                                                   *totals["prunable_parameters"])]
    rows += [(name, *vals) for name, vals in (metrics or {}).items()]

    def fmt(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:,.4g}"

    lines = ["| | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {fmt(d)} | {fmt(p)} | {p / d:.1%} |" if d else f"| {n} | {fmt(d)} | {fmt(p)} | - |"
              for n, d, p in rows]
    lines += ["", "Kept per layer (pruned/dense):", "",
              "| | " + " | ".join(f"L{i}" for i in range(max(len(v["dense"]) for v in table.values()))) + " |",
              "|---|" + "---:|" * max(len(v["dense"]) for v in table.values())]
    for key, label in ROWS:
        cells = [f"{p}/{d}" for d, p in zip(table[key]["dense"], table[key]["pruned"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + f"\n\n![heads kept per layer]({PNG_FILE})\n"
    (out / MD_FILE).write_text(markdown)
    return {"per_layer": table, "totals": {k: {"dense": d, "pruned": p} for k, (d, p) in totals.items()},
            "metrics": {k: {"dense": d, "pruned": p} for k, (d, p) in (metrics or {}).items()},
            "png": str(out / PNG_FILE), "markdown": markdown}
