"""The book's figure style and the few figure helpers that more than one chapter uses.

    from teal_nb import plots
    plots.set_theme()
    fig = plots.fitted_densities(hist, fits, layers=[0, 10, 20, 29])

matplotlib and seaborn are imported here only (the package itself never needs them).
"""
from __future__ import annotations

import torch

from .config import HIDDEN_STATES

# One colour per hidden state and per law, the same in every chapter.
STATE_COLORS = {"attn_in": "#0173b2", "attn_out": "#de8f05", "mlp_in": "#029e73", "mlp_mid": "#d55e00"}
LAW_COLORS = {"data": "#4d4d4d", "gaussian": "#0173b2", "laplace": "#d55e00", "gennorm": "#029e73"}
LAW_LABELS = {"gaussian": "Gaussian", "laplace": "Laplace", "gennorm": "generalized normal"}
PROTOCOL_STYLES = {"last_half": "-", "all": "--", "none": ":"}


def set_theme(context: str = "notebook") -> None:
    """seaborn's whitegrid with the book's sizes; call once at the top of a chapter."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context=context, style="whitegrid", palette="colorblind", font_scale=0.85)
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "axes.titlesize": "medium", "axes.titleweight": "bold",
                         "legend.frameon": False, "figure.constrained_layout.use": True})


def fitted_densities(hist, fits, layers, states=HIDDEN_STATES, laws=("gaussian", "laplace"),
                     logy: bool = False, span: float = 4.0, bins: int = 81):
    """Grid of panels (rows: layers, columns: hidden states): the data's density from the calibration
    histogram and the fitted laws' densities, over +-`span` standard deviations."""
    import matplotlib.pyplot as plt

    from .distributions import empirical_density, pdf

    fig, axes = plt.subplots(len(layers), len(states), figsize=(2.6 * len(states), 1.9 * len(layers)),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for c, state in enumerate(states):
            ax, s = axes[r, c], HIDDEN_STATES.index(state)
            width = span * fits.stats["std"][layer, s].item()
            edges = torch.linspace(-width, width, bins + 1, dtype=torch.float64)
            dens = empirical_density(hist, layer, s, edges)
            ax.stairs(dens.numpy(), edges.numpy(), fill=True, color=LAW_COLORS["data"], alpha=0.35,
                      label="data")
            x = torch.linspace(-width, width, 401, dtype=torch.float64)
            for law in laws:
                ax.plot(x.numpy(), pdf(law, x, fits.law_params(law, layer, s)).numpy(),
                        color=LAW_COLORS[law], lw=1.3, label=LAW_LABELS[law])
            if logy:
                ax.set_yscale("log")
                ax.set_ylim(bottom=max(dens[dens > 0].min().item() if (dens > 0).any() else 1e-6, 1e-6))
            ax.set_yticks([]) if not logy else None
            if r == 0:
                ax.set_title(state, color=STATE_COLORS.get(state, "black"))
            if c == 0:
                ax.set_ylabel(f"layer {layer}")
    axes[0, -1].legend(loc="upper right", fontsize="x-small")
    return fig


def layer_state_heatmap(values, ax=None, title: str = "", cmap: str = "vlag", center=None, fmt: str = ".2f",
                        annot: bool = False, cbar_label: str = "", states=HIDDEN_STATES, **kw):
    """A [layers, states] quantity as a heatmap: states as rows, layers as columns."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    v = torch.as_tensor(values).double().T.numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(min(14, 0.32 * v.shape[1] + 2), 0.45 * v.shape[0] + 1))
    sns.heatmap(v, ax=ax, cmap=cmap, center=center, annot=annot, fmt=fmt, yticklabels=list(states),
                cbar_kws={"label": cbar_label, "shrink": 0.9}, linewidths=0.3, **kw)
    ax.set_xlabel("layer")
    ax.set_title(title)
    return ax


def by_state(ax, x, series: dict, **kw):
    """One line per hidden state (`series`: state -> values over `x`), in the book's state colours."""
    for state, y in series.items():
        ax.plot(x, y, color=STATE_COLORS.get(state), label=state, **kw)
    return ax


__all__ = ["set_theme", "fitted_densities", "layer_state_heatmap", "by_state", "STATE_COLORS",
           "LAW_COLORS", "LAW_LABELS", "PROTOCOL_STYLES"]
