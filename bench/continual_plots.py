"""The main job's plots: accuracy on each task over the sequence, and the flatness of the solutions."""

from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results, tasks_by_bench, path):
    """Accuracy on each task over the sequence, one panel per (scenario, method). A diverged method
    keeps its panel: the tasks learnt before the divergence, and a red mark where it happened."""
    plt = _pyplot()
    benches = list(results)
    methods = list(dict.fromkeys(m for bench in benches for m in results[bench]))
    fig, axes = plt.subplots(
        len(benches), len(methods), figsize=(3.2 * len(methods), 2.8 * len(benches)), squeeze=False
    )
    for r, bench in enumerate(benches):
        tasks = tasks_by_bench[bench]
        for c, method in enumerate(methods):
            ax = axes[r][c]
            result = results[bench].get(method)
            title = f"{bench}: {method}"
            if result is not None:
                matrix = result["accuracy_matrix"]
                for j, task in enumerate(tasks[: len(matrix)]):
                    ax.plot(
                        range(j, len(matrix)), [row[j] for row in matrix[j:]], marker="o", label=task["name"]
                    )
                if "diverged" in result:
                    at = result["diverged_at_task"]
                    ax.axvline(at, color="red", linestyle="--")
                    ax.text(at, 0.5, " diverged", color="red", fontsize=8)
                    title += " (diverged)"
            ax.set_ylim(0, 1.02)
            ax.set_xlim(-0.3, len(tasks) - 0.7)
            ax.set_xticks(range(len(tasks)))
            ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel("test accuracy")
            if r == len(benches) - 1:
                ax.set_xlabel("after training task")
    for row in axes:
        if row[-1].get_legend_handles_labels()[0]:
            row[-1].legend(fontsize=6, loc="lower left")
    # Fixed margins in inches: tight_layout measures every label of the 48-panel grid (0.7 s of
    # the quick run's 30 s budget) to arrive at about the same.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.1 / width, bottom=0.55 / height, top=1 - 0.3 / height,
                        wspace=0.28, hspace=0.45)  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(results, tasks_by_bench, path):
    """One panel per scenario, a line per method: the mean accuracy over the tasks seen so far,
    after each task (a diverged method's line ends where it diverged)."""
    plt = _pyplot()
    benches = list(results)
    fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 4.2), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, bench in zip(axes[0], benches):
        for k, (method, result) in enumerate(results[bench].items()):
            matrix = result["accuracy_matrix"]
            seen = [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(matrix)]
            ax.plot(range(len(seen)), seen, marker="o", markersize=3, linestyle=styles[k // 10 % len(styles)],
                    label=method + (" (diverged)" if "diverged" in result else ""))  # fmt: skip
        n = len(tasks_by_bench[bench])
        ax.set_ylim(0, 1.02)
        ax.set_xticks(range(n))
        ax.set_xlabel("after training task")
        ax.set_title(bench)
    axes[0][0].set_ylabel("mean accuracy over the tasks seen")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_flatness(results, tasks_by_bench, path):
    """Per scenario: the mean top Hessian eigenvalue of the seen tasks' losses after each task, one
    line per method; and large_lr's first-task sharpness against its stability threshold."""
    plt = _pyplot()
    benches = list(results)
    curves = [b for b in benches if "sharpness_curve" in results[b].get("large_lr", {})]
    columns = 1 + bool(curves)
    fig, axes = plt.subplots(len(benches), columns, figsize=(5 * columns, 3 * len(benches)), squeeze=False)
    for r, bench in enumerate(benches):
        ax = axes[r][0]
        for method, result in results[bench].items():
            flat = result.get("flatness")
            if not flat:
                continue
            means = [sum(row["sharpness"]) / len(row["sharpness"]) for row in flat]
            ax.plot(range(len(means)), means, marker="o", label=method)
        ax.set_title(f"{bench}: mean top eigenvalue of the seen tasks", fontsize=9)
        ax.set_xlabel("after training task")
        ax.set_xticks(range(len(tasks_by_bench[bench])))
        ax.legend(fontsize=6)
        if columns == 2:
            ax = axes[r][1]
            history = results[bench].get("large_lr", {}).get("sharpness_curve", [])
            if history:
                steps = [row["step"] for row in history]
                ax.plot(steps, [row["sharpness"] for row in history], label="first task's top eigenvalue")
                ax.plot(steps, [row["threshold"] for row in history], linestyle="--", label="2 / lr")
                ax.legend(fontsize=6)
            ax.set_title(f"{bench}: large_lr at the edge of stability", fontsize=9)
            ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
