"""Report rendering: the leaderboard as text, the verdict and notes, and the report's blocks
written out as report.md and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vaebench.reporting.runs import BOUND_COLUMN, METRICS, RunSet, picture_prefix
from vaebench.scoring.collapse import ACTIVE_UNIT_THRESHOLD
from vaebench.scoring.evaluation import MI_IMAGES
from vaebench.spec.catalogue import MetricInfo


def display_table(table: pd.DataFrame, metric: MetricInfo) -> pd.DataFrame:
    """The leaderboard as text: "mean ± std" (just the mean for one run)."""
    rank = table["rank"].map(lambda r: "" if pd.isna(r) else str(r))
    shown = pd.DataFrame({"rank": rank, "variant": table["variant"]})
    if table["compared_within"].nunique() > 1:
        shown["ranked within"] = table["compared_within"]
    shown["runs"] = table["runs"].astype(str)
    for m in (m for m in METRICS.values() if f"{m.name}_mean" in table):
        shown[m.label] = metric_cells(table, m)
    shown[f"ties best ({metric.name})"] = table["ties_best"]
    if table["not_finished"].any():
        shown["not finished"] = table["not_finished"].astype(str)
    return shown


def metric_cells(table: pd.DataFrame, metric: MetricInfo) -> list[str]:
    """A leaderboard's ``metric`` per variant as "mean ± std", with "(n=k)" where only k of
    the variant's runs have it."""
    columns = table[[f"{metric.name}_mean", f"{metric.name}_std", f"{metric.name}_count", "runs"]]
    return [
        mean_std(mean, std, metric.digits) + (f" (n={n})" if 0 < n < runs else "")
        for mean, std, n, runs in columns.itertuples(index=False)
    ]


def mean_std(mean: float, std: float, digits: int) -> str:
    """"mean ± std"; the mean alone where the spread is unknown (NaN), "–" without a mean."""
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict(table: pd.DataFrame, metric: MetricInfo) -> str:
    """Who is best (per comparison group), who ties, and what cannot be judged."""
    direction = "higher" if metric.higher_is_better else "lower"
    ranked = table[table["rank"].notna()]
    several = table["compared_within"].nunique() > 1
    sentences = [f"Ranked on {metric.label}, {direction} is better."]
    if several:
        settings = " and ".join(dict.fromkeys(map(comparison_name, table["compared_within"])))
        sentences.append(
            f"Runs with different {settings} are ranked apart: their values are not comparable."
        )
    for group, rows in ranked.groupby("compared_within", sort=False):
        best = rows.iloc[0]
        value = mean_std(best[f"{metric.name}_mean"], best[f"{metric.name}_std"], metric.digits)
        among = f" among {group}" if several else ""
        text = f"Best{among}: **{best['variant']}**, {value} over {count(best['runs'], 'run')}."
        ties = list(rows.loc[rows["ties_best"] == "yes", "variant"])
        if ties:
            text += f" Within one standard deviation of it (a tie): {', '.join(ties)}."
        elif (rows["ties_best"] == "no").any():
            text += " No other variant lies within one standard deviation of it."
        sentences.append(text)
    if (ranked[f"{metric.name}_count"] == 1).any():
        sentences.append(
            "Variants with a single run show no spread: one run cannot estimate it, so"
            " ties with them cannot be judged."
        )
    if unranked := ", ".join(table.loc[table["rank"].isna(), "variant"]):
        sentences.append(f"Unranked, without a value of {metric.name}: {unranked}.")
    return " ".join(sentences)


def measurement_notes(run_set: RunSet, metric: MetricInfo) -> str:
    """What the numbers are: which split selects, which are bounds, and on what."""
    finished = run_set.finished
    notes = [
        f"Variants are ranked on {metric.name} (validation split, held out of the training "
        "images); test columns score the same runs on the test split once, after training, "
        "and are shown beside, never used to rank."
        if metric.split == "validation"
        else f"Variants are ranked on {metric.name}; test columns are shown beside."
    ]
    binarize = finished.get("params.data.binarize", pd.Series(dtype=object))
    recon = finished.get("params.loss.recon", pd.Series(dtype=object))
    if ((binarize == "none") & (recon == "bce")).any():
        notes.append(
            "ELBO and reconstruction of runs with data.binarize none are BCE on grey-level "
            "pixels: not a likelihood bound (grey-level pixels); compare them with each "
            "other, not with published log-likelihoods."
        )
    if (recon == "mse").any():
        notes.append("With loss.recon mse the ELBO is squared error plus KL: not a bound.")
    if (finished[BOUND_COLUMN] == "p(x|y)").any():
        notes.append(
            "cvae runs are given the label: their ELBO bounds log p(x|y), not log p(x), and "
            "their clusters are not scored."
        )
    if finished["val_mi"].notna().any():
        notes.append(
            "val active units (latent dimensions whose E[z|x] varies over the validation split, "
            f"variance above {ACTIVE_UNIT_THRESHOLD}) and val MI (I(x; z), estimated on "
            f"{MI_IMAGES} validation images, at most log {MI_IMAGES} = "
            f"{math.log(MI_IMAGES):.2f} nats) are the last epoch's: near 0, the posterior "
            "collapsed."
        )
    with_nll = finished[finished["test_nll"].notna()]
    if not with_nll.empty:
        column = with_nll.get("params.eval.iwae_samples", pd.Series(dtype=object))
        samples = sorted({int(k) for k in column if str(k).isdigit()})
        images = with_nll.get("params.eval.iwae_images", pd.Series(dtype=object))
        subsets = sorted({int(n) for n in images if str(n).isdigit()})
        over = ", over the whole test split"
        if subsets:
            over = (f", over {' or '.join(map(str, subsets))} test images for runs that set "
                    "eval.iwae_images (the same seeded random subset for every run; the others: "
                    "all of them)")
        notes.append(
            "test NLL: -log p(x) (-log p(x|y) for cvae runs) in nats per image, estimated by "
            "importance sampling (IWAE) with "
            f"K = {', '.join(map(str, samples))} samples on binary pixels{over}; the estimate "
            "is an upper bound on the NLL in expectation."
        )
    return " ".join(notes)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def comparison_name(group: str) -> str:
    """"loss.recon=bce, data.dataset=mnist" -> "loss.recon/data.dataset"."""
    return "/".join(part.split("=", 1)[0] for part in group.split(", "))


Block = tuple[str, Any]  # ("h1"|"h2"|"p", text) | ("table", DataFrame) | ("img", (path, caption))


def report_blocks(
    run_set: RunSet, table: pd.DataFrame, metric: MetricInfo, figures: list[Path],
    bests: list[tuple[pd.Series, list[Path]]],
) -> list[Block]:
    invocations = (
        f"invocation {run_set.parents.iloc[-1]['tags.mlflow.runName']}"
        if len(run_set.parents) == 1
        else f"all {len(run_set.parents)} invocations"
    )
    not_finished = int((run_set.runs["status"] != "FINISHED").sum())
    source = (
        f"Experiment {run_set.experiment} in {run_set.uri}, {invocations}: "
        f"{count(len(run_set.finished), 'finished run')} in {count(len(table), 'variant')}"
    )
    if not_finished:
        source += f"; {count(not_finished, 'run')} not finished, left out"
    if run_set.repeats:
        repeats = count(run_set.repeats, "earlier rerun")
        source += f"; {repeats} of the same config, seed, device and code, left out"
    source += f". Made {time.strftime('%Y-%m-%d %H:%M')}."
    captions = {
        "rate_distortion.png": "Rate and distortion: KL against reconstruction, a dot per run; "
        "lines join the per-β means of one setting.",
        "elbo_by_epoch.png": "Validation ELBO by epoch: the mean over seeds, with a band of one "
        "standard deviation and a dot per seed where a variant has several.",
        "nmi_by_epoch.png": "Validation NMI of the clusters by epoch: the mean over seeds, with a "
        "band of one standard deviation and a dot per seed where a variant has several.",
        "clustering.png": "Clustering on the test split: NMI and accuracy of the clusters "
        "(whiskers: one std).",
        "epoch_seconds.png": "Training seconds per epoch after the first (whiskers: one std).",
    }
    blocks: list[Block] = [
        ("h1", f"vaebench report: {run_set.experiment}"), ("p", source), ("h2", "Leaderboard"),
        ("p", verdict(table, metric)), ("p", measurement_notes(run_set, metric)),
        ("table", display_table(table, metric)),
    ]
    blocks += [("img", (figure, captions[figure.name])) for figure in figures]
    for best, pictures in bests:
        among = f", among {best['compared_within']}" if len(bests) > 1 else ""
        blocks.append(("h2", f"Best variant{among}: {best['variant']} (run {best['name']})"))
        prefix = picture_prefix(best["compared_within"], len(bests))
        blocks += [
            ("img", (picture, f"{best['name']}: {picture.stem.removeprefix(prefix)}"))
            for picture in pictures
        ]
    return blocks


MD_PREFIX = {"h1": "# ", "h2": "## ", "p": ""}


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, value in blocks:
        if kind in MD_PREFIX:
            out.append(f"{MD_PREFIX[kind]}{value}")
        elif kind == "table":
            rows = [value.columns, *value.itertuples(index=False)]
            cells = [[str(v).replace("|", "\\|").replace("\n", " ") for v in row] for row in rows]
            lines = ["| " + " | ".join(row) + " |" for row in cells]
            out += [lines[0], "|" + "---|" * len(value.columns), *lines[1:]]
        elif kind == "img":
            path, caption = value
            out.append(f"![{path.stem}]({path.name})\n\n*{caption}*")
        out.append("")
    return "\n".join(out)


HTML_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3}td{text-align:right;white-space:nowrap}td:nth-child(2){text-align:left}
figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555;font-size:13px}
"""


def render_html(blocks: list[Block], title: str) -> str:
    """One self-contained page: the images are embedded as base64 data URIs."""
    out = [
        "<!doctype html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{HTML_STYLE}</style></head><body>",
    ]
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(str(value))}</{kind}>")
        elif kind == "p":
            bold = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(value)))
            out.append(f"<p>{bold}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in value.columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                for row in value.itertuples(index=False)
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            path, caption = value
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)
