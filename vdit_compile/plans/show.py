"""Human views of a plan: a text table of sites and PNG heatmaps of the calibrated attention mass."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .plan import Plan, SitePlan


def summarize_masks(masks, max_list: int = 4) -> str:
    """``"g1w0 g0w0"`` for few heads, else counts (``"g1w0 x5, dense x3"``)."""
    names = [m.name for m in masks]
    if not names:
        return "-"
    if len(names) <= max_list:
        return " ".join(names)
    return ", ".join(f"{n} x{c}" for n, c in Counter(names).most_common())


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def family_summary(masks) -> str:
    """Heads per family: ``"win3d 3, tile 2, dense 1"``."""
    if not masks:
        return "-"
    fams = Counter("dense" if m.dense else m.family for m in masks)
    return ", ".join(f"{f} {c}" for f, c in fams.most_common())


def site_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for s in plan.sites:
        errs = [e for e in s.errors if e is not None]
        tile = "-" if not s.tiled else (f"{s.tile[0]}x{s.tile[1]}" if s.tile is not None else "frame")
        masks = summarize_masks(s.masks) if s.masks else "dense"
        if s.step_ranges:
            masks = f"[{len(s.step_ranges)} step ranges, see below] " + masks
        rows.append([
            s.name, s.kind, s.layout.describe() if s.layout is not None else "-", str(s.num_heads), s.status,
            tile, family_summary(s.masks) if s.tiled else "-", masks,
            _fmt(s.density if s.tiled or s.masks else 1.0), _fmt(max(errs) if errs else None, ".4f"), s.reason,
        ])
    return rows


HEADER = ["site", "kind", "layout", "heads", "status", "tile", "families", "masks (per head)", "density",
          "max error", "note"]


def format_step_ranges(plan: Plan) -> list[str]:
    """Per step-aware site and range: the timestep bound, the families and the masks per head."""
    out = []
    for s in plan.sites:
        if not (s.tiled and s.step_ranges):
            continue
        out.append(f"{s.name}:")
        prev = None
        for r in s.step_ranges:
            span = (f"t >= {r.min_timestep:g}" if r.min_timestep is not None else "every lower t") + \
                (f" (and < {prev:g})" if prev is not None and r.min_timestep is not None else "")
            dens = sum(r.densities) / len(r.densities) if r.densities else float("nan")
            out.append(f"  {span}: density {dens:.3f}; {family_summary(r.masks)}; {' '.join(m.name for m in r.masks)}")
            prev = r.min_timestep
    return out


def output_check_line(check: dict) -> str:
    """One line on what the output check did (``plan.calibration["output_check"]``, calibration.output_check)."""
    trials = ", ".join(f"{k} back: {p if isinstance(p, str) else f'{p:.2f}'} dB" for k, p in check["trials"])
    back = check["given_back"]
    line = (f"output check (calibration samples vs dense, target {check['target_psnr']:g} dB): {trials}; "
            + (f"{len(back)} of {len(check['candidates'])} sparse head(s) given back to dense ({', '.join(back)})"
               if back else "the plan meets it as calibrated"))
    if check.get("sparse_sites") is not None:
        line += f"; checked with {', '.join(check['sparse_sites']) or 'no site'} sparse (the cost model's choice)"
    return line


def format_table(plan: Plan) -> str:
    """Plain-text table (fixed-width columns) plus a header block with the plan's provenance."""
    rows = site_rows(plan)
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) if rows else len(HEADER[i]) for i in range(len(HEADER))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [f"plan v{plan.version} for {plan.model_class or '(any model)'}"]
    if plan.fingerprint:
        out.append(f"fingerprint {plan.fingerprint[:23]}...")
    cal = plan.calibration or {}
    if "error_budget" in cal:
        parts = [f"error budget {cal['error_budget']:g}"]
        for key, fmt in (("max_density", "max density {:g}"), ("num_prompts", "{} prompt(s)"),
                         ("num_inference_steps", "{} step(s)"), ("num_inputs", "{} transformer call(s)")):
            if cal.get(key) is not None:
                parts.append(fmt.format(cal[key]))
        out.append("calibration: " + ", ".join(parts) + f"; candidates {', '.join(cal.get('candidates') or [])}")
    elif "uniform" in cal:
        out.append(f"uniform plan: {cal['uniform']} on every tileable site (not calibrated)")
    if cal.get("output_check"):
        out.append(output_check_line(cal["output_check"]))
    tiled = plan.tiled_sites()
    if tiled:
        mean = sum(s.density for s in tiled) / len(tiled)
        out.append(f"{len(tiled)} of {len(plan.sites)} site(s) tiled, mean density of tiled sites {mean:.3f}")
    else:
        out.append(f"no site tiled ({len(plan.sites)} site(s))")
    out += ["", line(HEADER), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    ranges = format_step_ranges(plan)
    if ranges:
        out += ["", "step ranges (masks per range of the denoising timestep, high first):"] + ranges
    return "\n".join(out) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_heatmaps(plan: Plan, directory) -> list[Path]:
    """One PNG per site with calibrated ``frame_mass``: a panel per head, kept tiles outlined.

    Rows are query frames, columns key frames, the last row/column is text (when the site has
    text tokens); colour is the mean
    share of a query token's attention falling on that key group.  Sites without data (dense by
    kind, uniform plans) get no picture.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for s in plan.sites:
        if s.frame_mass is None:
            continue
        fm = s.frame_mass
        H, T = len(fm), len(fm[0]) - 1
        has_text = s.layout is None or (s.layout.text_prefix + s.layout.text_suffix) > 0
        if not has_text:  # the text row/column is empty: draw frames only
            fm = [[row[:T] for row in head[:T]] for head in fm]
        G = len(fm[0])
        cols = min(H, 4 if H <= 16 else 8)
        rows = (H + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows + 0.6), squeeze=False)
        labels = [str(f) for f in range(T)] + ["txt"] * has_text
        vmax = max(max(max(r) for r in head) for head in fm) or 1.0
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= H:
                ax.axis("off")
                continue
            im = ax.imshow(fm[h], cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
            mask = _head_mask(s, h)
            if mask is not None:
                keep = _frame_keep(mask, s, T)
                for i in range(T):
                    for j in range(T):
                        if keep[i, j]:
                            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="cyan", lw=0.8))
            err = s.errors[h] if h < len(s.errors) else None
            title = f"head {h}: {mask.name if mask else 'dense'}"
            if err is not None:
                title += f" (err {err:.3g})"
            ax.set_title(title, fontsize=8)
            step = max(1, G // 8)
            ax.set_xticks(range(0, G, step), [labels[i] for i in range(0, G, step)], fontsize=6)
            ax.set_yticks(range(0, G, step), [labels[i] for i in range(0, G, step)], fontsize=6)
            ax.set_xlabel("key frame", fontsize=7)
            ax.set_ylabel("query frame", fontsize=7)
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention mass")
        fig.suptitle(f"{s.name} [{s.layout.describe() if s.layout else '?'}] {s.status}; cyan = kept tiles", fontsize=9)
        path = directory / f"{_safe(s.name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _head_mask(s: SitePlan, h: int):
    if not s.masks:
        return None
    return s.masks[h] if len(s.masks) > 1 else s.masks[0]


def _frame_keep(mask, s: SitePlan, T: int):
    """``(T, T)`` bool: query frame i keeps some key unit of frame j (for a frame tile mask, its frame mask)."""
    import torch

    from ..masks.units import UnitGrid

    if s.layout is None or (s.tile is None and not mask.needs_tiles):
        return mask.unit_mask(UnitGrid.frames(T, 1, 1)) if not mask.dense else torch.ones(T, T, dtype=torch.bool)
    grid = s.unit_grid()
    if mask.dense:
        return torch.ones(T, T, dtype=torch.bool)
    um = mask.unit_mask(grid)
    upf = grid.units_per_frame
    return um.view(T, upf, T, upf).any(3).any(1)
