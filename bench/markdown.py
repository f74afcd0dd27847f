"""The report's markdown: the full report (``report``) and the headline snippet that README quotes
(``headline_snippet``, written beside the report as ``<stem>-headline.md``; ``bench/readme.py`` copies the
newest one per device into README)."""
import os
from typing import Dict, List

from . import block_maps, blocks, headline, peers, tables, targets


def _load(v) -> str:
    return " / ".join(f"{x:.1f}" for x in v) if v else "?"


def machine_line(res: dict) -> str:
    """Command, date and machine in one line."""
    m = res["machine"]
    hw = f"GPU {m['gpu']}" if m["gpu"] else f"{m['cpu_count']}-core {m['cpu']}"
    return (f"`{res.get('command', 'python bench/report.py')}` on {res['date']}: {hw}, torch {m['torch']}, "
            f"{m['torch_threads']} thread(s), load average {_load(m.get('load_average'))} at start; "
            f"report run {res['wall_s'] / 60:.1f} min, git {str(m['git_sha'])[:10]}")


def _ours_measured(block_records) -> bool:
    return any(r["layer"].startswith("opt_fast") and r.get("t_s") for r in block_records or [])


def headline_section(res: dict, plot: str = None, all_blocks: bool = True) -> List[str]:
    """The headline table and its note, the plot, and the block-layer table (in README's snippet only once
    opt_fast's block layers are measured in it)."""
    L = [tables.md_table(headline.HEADER, headline.table_rows(res["records"], res["size"], res["ops"])), "",
         headline.NOTE, ""]
    if plot:
        L += [f"![speed-up over the best alternative]({plot})", ""]
    if res.get("blocks") and (all_blocks or _ours_measured(res["blocks"])):
        L += ["Block-orthogonal layers, one layer's forward + backward (trainable parameters and input "
              "gradient), float32:", "", tables.md_table(blocks.HEADER, blocks.table_rows(res["blocks"])), "",
              tables.md_table(block_maps.TARGET_HEADER, block_maps.targets(res)), ""]
    return L


def headline_snippet(res: dict, report_path: str) -> str:
    """What README quotes: the command, date and machine in one line, the headline table, a link."""
    m = res["machine"]
    title = f"GPU {m['gpu']}" if m["gpu"] else f"CPU {m['cpu']}"
    L = [f"### {title} ({m['device_slug']})", "", machine_line(res) + f". Full report: [{report_path}]"
         f"({report_path}).", ""]
    L += headline_section(res, all_blocks=False)
    return "\n".join(L).rstrip() + "\n"


def report(res: dict, plot_paths: Dict[str, str], out_dir: str) -> str:
    m = res["machine"]
    speed = plot_paths.get("speedup")
    rel = (lambda p: os.path.relpath(p, out_dir)) if out_dir else (lambda p: p)
    L = [f"# opt_fast benchmark report: {m['device_slug']}, {res['date']}", "",
         machine_line(res) + ".", "", f"Peers: {peers.versions_line(res.get('peers', {}))}.", "",
         "**Measured on this machine, in this run.** Absolute times from a shared CPU are noisy; the ratios "
         "between implementations measured in the same run are the portable numbers.", "",
         "## Headline: opt_fast against the best torch built-in and the best peer", ""]
    L += headline_section(res, rel(speed) if speed and speed.endswith(".png") else None)
    L += ["## Setup", "", tables.md_table(["item", "value"], [
        ["size", res["size"]], ["device", res["device"]], ["cpu", m["cpu"]], ["gpu", m["gpu"] or "–"],
        ["cpu count / torch threads", f"{m['cpu_count']} / {m['torch_threads']} ({m['threads_note']})"],
        ["load average (1/5/15 min)", f"{_load(m.get('load_average'))} at start, "
                                      f"{_load(m.get('load_average_end'))} at end"],
        ["python / torch / triton", f"{m['python']} / {m['torch']} / {m['triton']}"],
        ["peers", peers.versions_line(res.get("peers", {}))],
        ["git", f"{m['git_sha']}{' (uncommitted changes)' if m['git_dirty'] else ''}"],
        ["float32 matmul precision", m["float32_matmul_precision"]],
        ["Triton float32 dot precision", m.get("triton_f32_precision") or "–"],
        ["kernels", ", ".join(f"{k}: {v}" for k, v in m["kernels"][res['device'].split(':')[0]].items()
                              if not k.endswith("_backward"))],
        ["wall time", f"{res['wall_s']:.0f} s (headline {res.get('headline_s', 0):.0f} s)"]]), ""]
    if res.get("block_maps"):
        L += ["## Block-orthogonal layers: maps and memory", "", block_maps.__doc__.split("\n\n")[0].strip(), "",
              tables.md_table(block_maps.MAP_HEADER, block_maps.map_rows(res["block_maps"])), ""]
        if res.get("block_memory"):
            L += [tables.md_table(block_maps.MEM_HEADER, block_maps.memory_rows(res["block_memory"])), ""]
    if res.get("targets"):
        L += ["## Issue targets", "",
              "The ratios the issues state, at their exact shapes, each timed in this run with both sides "
              "interleaved (one call of each per round, medians). Accuracy where the issue states one.", "",
              tables.md_table(targets.HEADER, targets.rows(res["targets"])), ""]
    if "e2e" in res:
        e = res["e2e"]
        L += ["## End to end", "", f"### CNN-6 training step (forward + backward + optimizer step), batch {e['batch']}",
              "", "OPT layers from `opt_fast.nn.convert(model, method=m)` (`score` left plain); ogd trains R with "
              "`opt_fast.optim.CayleySGD`. Ratio = OPT step / plain step of the same network, both measured in "
              "this run on this machine (every network warmed up, then interleaved rounds of one step each; "
              "medians). Targets: ≤ 1.3× for gram_schmidt, householder, cayley; ≤ 1.6× for lowdin.", ""]
        L += [tables.md_table(tables.E2E_HEADER, tables.e2e_rows(e)) if e["status"] == "ok" else f"*{e['status']}*", ""]
        ls = res["layer_set"]
        L += [f"### {ls['name']}: R computation", "",
              f"Layer set {ls['layer_set']} ({{d: layers}}), {ls['dtype']}: R = map(P) forward + backward, one "
              f"batched op call per d-group; Σ t_bmm = {ls['t_bmm_s'] * 1e3:.2f} ms (one bmm per d-group).", "",
              tables.md_table(tables.LAYER_HEADER, tables.layer_rows(ls)), ""]
        if plot_paths.get("e2e", "").endswith(".png"):
            L += [f"![end to end]({rel(plot_paths['e2e'])})", ""]
    L += ["## Every implementation, per benchmark group", "",
          "kind: opt_fast = `torch.ops.opt_fast` (fwd+bwd through its registered backward op); reference = "
          "`opt_fast.reference.<op>_ref` called directly (fwd+bwd = autograd through its torch ops); compiled = "
          "that reference under `torch.compile`; torch = built-ins; peer = the packages above; context = a "
          "different map. µs: median (20th–80th percentile) per call; t/t_bmm: time / one same-size "
          "`torch.bmm` (b×d×d @ b×d×d, same dtype). err vs fp64 ref: ‖out − ref‖_F/‖ref‖_F against the "
          "op's map in float64 (only for impls computing the same map). The headline's cases ran first with few "
          "rounds; the rest got the time left (\"skipped: time budget\" where it ran out). "
          + tables.ACCURACY_NOTE + ".", ""]
    for group, recs in tables.groups(res["records"]).items():
        L += [f"### {group}", "", tables.md_table(tables.DETAIL_HEADER, tables.detail_rows(recs)), ""]
    return "\n".join(L)
