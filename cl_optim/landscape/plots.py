"""PNG plots of the landscape measurements (matplotlib, an optional dependency: the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_spectrum", "plot_monitor", "plot_interpolation", "plot_surface"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the landscape plots need matplotlib: pip install matplotlib") from error
    return plt


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()


def plot_spectrum(grid, density, path, title: str = "Hessian spectral density (SLQ)") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(list(map(float, grid)), [max(float(d), 1e-12) for d in density])
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    _save(fig, path)


def plot_monitor(history: list, path, title: str = "sharpness and stability threshold") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in history]
    label = (
        "preconditioned sharpness" if history and history[0]["preconditioned"] else "top Hessian eigenvalue"
    )
    ax.plot(steps, [row["sharpness"] for row in history], marker="o", label=label)
    ax.plot(steps, [row["threshold"] for row in history], linestyle="--", label="stability threshold")
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title(title)
    _save(fig, path)


def plot_interpolation(paths: dict, path, title: str = "loss along the line between solutions") -> None:
    """``paths``: label -> the dict :func:`cl_optim.landscape.interpolate` returns."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, result in paths.items():
        ax.plot(result["alpha"], result["loss"], label=f"{label} (barrier {result['barrier']:.3g})")
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title)
    _save(fig, path)


def plot_surface(surface: dict, path, title: str = "loss surface") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4) if surface["loss"].dim() == 2 else (6, 3.5))
    t = surface["coordinates"]
    loss = surface["loss"]
    if loss.dim() == 1:
        ax.plot(t, loss.tolist())
        ax.set_xlabel("step along the direction")
        ax.set_ylabel("loss")
    else:
        contour = ax.contourf(t, t, loss.t().tolist(), levels=20)
        fig.colorbar(contour, ax=ax)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    ax.set_title(title)
    _save(fig, path)
