"""Printing, saving and plotting a ``hetis bench`` result."""
from __future__ import annotations

import json
import os

METRICS = [("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
           ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")]


def print_summary(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    con = console or Console()
    t = Table(title=f"hetis bench: {result.get('target', '?')}  {result.get('dtype', '')}  "
              f"{result['dataset']}  rate={result['request_rate']}", title_justify="left",
              show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")

    def row(name, value, fmt="{:.2f}"):
        t.add_row(name, value if isinstance(value, str) else fmt.format(value))

    row("Successful requests", f"{result['completed']} (failed {result['failed']})")
    row("Benchmark duration (s)", result["duration_s"])
    row("Total input tokens", str(result["total_input_tokens"]))
    row("Total generated tokens", str(result["total_output_tokens"]))
    row("Request throughput (req/s)", result["request_throughput"])
    if "request_goodput" in result:
        slo = " ".join(f"{k}:{v:g}" for k, v in result["goodput_slo_ms"].items())
        row(f"Request goodput (req/s) [{slo}]", result["request_goodput"])
    row("Output token throughput (tok/s)", result["output_throughput"])
    row("Total token throughput (tok/s)", result["total_token_throughput"])
    for key, title in METRICS:
        t.add_section()
        t.add_row(f"[bold]{title}[/] (ms)", "")
        row("  mean / median / std", f"{result[f'mean_{key}_ms']:.2f} / "
            f"{result[f'median_{key}_ms']:.2f} / {result[f'std_{key}_ms']:.2f}")
        for p in result.get("percentiles", []):
            row(f"  P{p:g}", result[f"p{p:g}_{key}_ms"])
    base = result.get("baseline")
    if base:
        t.add_section()
        t.add_row(f"[bold]Baseline: {base['name']}[/] (batch {base['batch_size']}, "
                  f"{base['dtype']})", "")
        row("  duration (s)", base["duration_s"])
        row("  output token throughput (tok/s)", base["output_throughput"])
        row("  mean end-to-end latency (ms)", base["mean_e2el_ms"])
        row("  hetis / baseline output throughput", f"{result['speedup_vs_baseline']:.2f}x")
    con.print(t)


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def _cdf(ax, values, label):
    import numpy as np
    v = np.sort(np.asarray(values, dtype=float))
    if v.size:
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label)


def plot(result: dict, path: str, title: str | None = None) -> None:
    """Latency CDFs (TTFT, TPOT, ITL, E2EL), per-request TTFT and TPOT against prompt
    length, and output throughput against the baseline when there is one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["requests"] if r["success"]]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    series = {"TTFT": [r["ttft_ms"] for r in rows],
              "TPOT": [r["tpot_ms"] for r in rows if r["tpot_ms"] is not None],
              "ITL": [g for r in rows for g in r["itl_ms"]],
              "E2EL": [r["e2el_ms"] for r in rows]}
    ax = axes[0, 0]
    for name in ("TTFT", "E2EL"):
        _cdf(ax, series[name], name)
    ax.set(xlabel="ms", ylabel="fraction of requests", title="TTFT and end-to-end latency CDF")
    ax = axes[0, 1]
    for name in ("TPOT", "ITL"):
        _cdf(ax, series[name], name)
    ax.set(xlabel="ms", ylabel="fraction", title="TPOT (per request) and ITL (per gap) CDF")
    for ax in axes[0, :2]:
        ax.grid(alpha=.3)
        ax.legend()
    ax = axes[0, 2]
    ax.scatter([r["send_time_s"] for r in rows], [r["ttft_ms"] for r in rows], s=12, label="TTFT")
    ax.set(xlabel="send time (s)", ylabel="TTFT (ms)", title="TTFT over the run")
    ax.grid(alpha=.3)
    ax = axes[1, 0]
    ax.scatter([r["prompt_len"] for r in rows], [r["ttft_ms"] for r in rows], s=12)
    ax.set(xlabel="prompt tokens", ylabel="TTFT (ms)", title="TTFT per request")
    ax.grid(alpha=.3)
    ax = axes[1, 1]
    pts = [(r["prompt_len"], r["tpot_ms"]) for r in rows if r["tpot_ms"] is not None]
    ax.scatter([p for p, _ in pts], [t for _, t in pts], s=12, color="tab:orange")
    ax.set(xlabel="prompt tokens", ylabel="TPOT (ms)", title="TPOT per request")
    ax.grid(alpha=.3)
    ax = axes[1, 2]
    names, vals = ["hetis"], [result["output_throughput"]]
    if result.get("baseline"):
        b = result["baseline"]
        names.append(f"{b['name']}\n(batch {b['batch_size']}, {b['dtype']})")
        vals.append(b["output_throughput"])
    bars = ax.bar(names, vals, color=["tab:blue", "tab:gray"][:len(vals)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set(ylabel="output tokens/s", title="Output throughput" + (
        f" ({result['speedup_vs_baseline']:.2f}x)" if result.get("baseline") else ""))
    fig.suptitle(title or f"hetis bench: {result.get('target', '?')} {result.get('dtype', '')}, "
                 f"{result['num_prompts']} requests ({result['dataset']}), rate "
                 f"{result['request_rate']}, {result['threads']} threads")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(results: dict[str, dict], path: str, title: str = "") -> None:
    """Several runs side by side: output throughput bars and TTFT / TPOT / E2EL CDFs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    names = list(results)
    bars = axes[0].bar(names, [results[n]["output_throughput"] for n in names],
                       color=[f"C{i}" for i in range(len(names))])
    axes[0].bar_label(bars, fmt="%.1f")
    axes[0].set(ylabel="output tokens/s", title="Output throughput")
    for ax, key, label in [(axes[1], "ttft_ms", "TTFT"), (axes[2], "tpot_ms", "TPOT"),
                           (axes[3], "e2el_ms", "End-to-end latency")]:
        for n in names:
            rows = [r for r in results[n]["requests"] if r["success"] and r[key] is not None]
            _cdf(ax, [r[key] for r in rows], n)
        ax.set(xlabel="ms", ylabel="fraction of requests", title=f"{label} CDF")
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
