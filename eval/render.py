"""report.md: the results tables (best per column in bold), the headline, the reasons and ablation sections and
the chosen hyperparameters."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eval.ablation import ablation_markdown
from eval.data import SLICES

LOWER_IS_BETTER = ("gini@",)
BEYOND_ACCURACY = ("coverage@", "gini@", "tail_share@")
NO_BEST = ("new_share@",)  # how many new songs a ranking shows is a trade-off (see the warm slice), not a score


def table_columns(ks: list[int], slice_name: str) -> list[str]:
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["hr@20", "mrr", "coverage@20", "gini@20"]
    if slice_name == "cold":
        return cols
    return cols + ["tail_share@20"] + (["new_share@20"] if slice_name in ("all", "warm") else [])


def _best_per_column(rows: dict[str, dict], cols: list[str]) -> dict[str, float]:
    best = {}
    for c in cols:
        if c.startswith(NO_BEST):
            continue
        # Random trivially "wins" coverage/gini/tail share; bold the best real model there.
        vals = [r[c] for m, r in rows.items() if c in r and np.isfinite(r[c])
                and not (m == "random" and c.startswith(BEYOND_ACCURACY))]
        if vals:
            best[c] = min(vals) if c.startswith(LOWER_IS_BETTER) else max(vals)
    return best


def markdown_table(rows: dict[str, dict], cols: list[str]) -> list[str]:
    best = _best_per_column(rows, cols)
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for model, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            text = "–" if v is None or not np.isfinite(v) else f"{v:.4f}"
            cells.append(f"**{text}**" if v is not None and c in best and v == best[c] else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _ci(c: dict) -> str:
    return f"{c['mean']:.4f} [{c['lo']:.4f}, {c['hi']:.4f}]"


def render_markdown(report: dict, plots: list[Path]) -> str:
    sp_ = report["split"]
    out = [f"# Offline evaluation: {report['dataset']}", ""]
    out += [f"- {n}" for n in report["notes"]]
    out += ["", f"Split: `{sp_['kind']}` (split time {sp_['split_time']}); train {sp_['train']} / valid "
                f"{sp_['valid']} / test {sp_['test']} interactions; {sp_['warm_songs']} warm and {sp_['cold_songs']} "
                f"cold {report['item_kind']}s; {sp_['repeat_test_pairs_dropped']} test pairs already in train dropped.",
            "Full-catalogue ranking, seen items masked; `warm-known` ranks the warm test plays among known songs "
            "only, and the cold slice ranks among the split's new items only. "
            f"Text features: {report['text_features']}.", ""]
    for name in SLICES:
        info = sp_["slices"][name]
        out.append(f"## {name} — {info['test_users']} users, {info['test_pairs']} test pairs, "
                   f"{info['candidates']} candidates ({info['users_skipped']} users without a test play skipped)")
        out.append("")
        if info["empty"]:
            out += ["Empty slice: no test plays here, so no model is scored (not a zero).", ""]
            continue
        out += markdown_table(report["results"][name], table_columns(report["ks"], name)) + [""]
    out += ["Bold: best per column (lowest for gini; random is left out of coverage/gini/tail share). "
            "tail_share@20: share of the top-20 slots holding known songs outside the top 20% of known songs by "
            "training plays (new songs are never tail; they are counted by new_share@20). "
            "new_share@20: share holding new songs (no training plays), not bolded: on `warm` every such slot is "
            "one a known song could have hit, on `all` it is what lets new songs be found.", ""]
    tail = report["hyperparameters"].get("hybrid-tail")
    if tail:
        out += [f"`hybrid` is tuned for recall on validation. `hybrid-tail` is the same blend tuned for long-tail "
                f"exposure: the most tail songs in the validation top 20 while NDCG@20 stays within "
                f"{tail['ndcg_budget']:.0%} of ALS's (popularity penalty {tail['pop_penalty']}, cold offset "
                f"{tail['cold_offset']}). Within the budget means one standard error on the safe side (the paired NDCG "
                "change vs ALS over validation users, minus its standard error, stays above the budget); the test "
                "figures above say whether it held out of sample.", ""]
    out += ["## Headline: recall@20 with 95% bootstrap CIs (users resampled)", ""]
    for name, h in report["headline"].items():
        if h.get("empty"):
            out.append(f"- {name}: empty slice")
            continue
        models = ", ".join(f"{m} {_ci(c)}" for m, c in h["models"].items())
        diffs = ", ".join(f"{d} {_ci(c)}" for d, c in h["differences"].items())
        out.append(f"- {name}: best CF = {h['best_cf']}; {models}" + (f"; differences: {diffs}" if diffs else ""))
    out += reasons_markdown(report.get("reasons") or {})
    if report.get("ablation", {}).get("accuracy"):
        out += [""] + ablation_markdown(report["ablation"])
    out += ["", "## Hyperparameters", "", f"Chosen by {report['tuning']['how']}:", ""]
    out += [f"- {m}: {json.dumps(p)}" for m, p in report["hyperparameters"].items()]
    out += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


REASON_COLUMNS = ("faithfulness", "hallucination_rate", "claims_per_reason", "no_claim_share", "titles_from_history",
                  "unique_share", "distinct_2", "mean_words", "degenerate_share")
N_MD_SAMPLES = 5


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def reasons_markdown(r: dict) -> list[str]:
    """The reason-quality section: the reasons the endpoint returns, the model's greedy answers before the claim
    check, the plain evidence sentences, by kind of claim, and a few samples."""
    out = ["", "## Reasons", ""]
    if r.get("skipped"):
        out.append(f"Not generated: {r['skipped']}.")
    rows = [(f"llmrec as served ({r['n']} held-out plays)", r)] if r.get("n") else []
    if (r.get("model_greedy") or {}).get("n"):
        rows.append(("model's greedy answer, before the check", r["model_greedy"]))
    if (r.get("evidence_sentence") or {}).get("n"):
        rows.append(("plain evidence sentence (the fallback)", r["evidence_sentence"]))
    if rows:
        out += ["", "| reasons | " + " | ".join(REASON_COLUMNS) + " |", "|---" * (len(REASON_COLUMNS) + 1) + "|"]
        out += [f"| {name} | " + " | ".join(_num(m.get(c)) for c in REASON_COLUMNS) + " |" for name, m in rows]
        out += ["", f"Claims (co-listening percentages, artists, albums, genres, tags, keywords, perceived attributes, "
                    f"quoted titles) checked against {r.get('ground_truth', 'the catalog')}; faithfulness = true "
                    f"claims / claims, hallucination rate = reasons with a false claim / reasons, no_claim_share = "
                    f"reasons with nothing checkable beyond a history title."]
    if r.get("sources"):
        src = r["sources"]
        out.append(f"Served: {_num(r.get('verified_share'))} verified; from the model {_num(src.get('model'))}, "
                   f"the evidence sentence {_num(src.get('evidence'))}, generic {_num(src.get('generic'))} "
                   f"({r.get('samples_per_reason')} answers checked per reason).")
    perceived = r.get("perceived") or {}
    if perceived.get("n"):
        out.append(f"Perceived attributes listed as evidence (perception heads on the encoder features, calibrated "
                   f"confidence >= threshold): {perceived['n']}, true {_num(perceived['accuracy'])} ("
                   + ", ".join(f"{a} {_num(v)}" for a, v in perceived["by_attribute"].items()) + ").")
    dep = r.get("prompt_dependence") or {}
    if dep.get("prompt_gain") is not None:
        out += ["", f"Does the model read its prompt? Answer loss of the evidence sentences after their own prompt "
                    f"{dep['answer_loss']:.3f}, after another play's prompt {dep['answer_loss_other_prompt']:.3f} "
                    f"(gain {dep['prompt_gain']:.3f}; near 0 = the prompt is ignored)."]
    if r.get("by_kind"):
        greedy = (r.get("model_greedy") or {}).get("by_kind", {})
        out += ["", "By kind of claim:", "", "| claim | n served | faithfulness served | n greedy | faithfulness "
                "greedy |", "|---|---:|---:|---:|---:|"]
        for kind in sorted(set(r["by_kind"]) | set(greedy)):
            m, g = r["by_kind"].get(kind, {}), greedy.get(kind, {})
            out.append(f"| {kind} | {m.get('n', 0)} | {_num(m.get('faithfulness'))} | {g.get('n', 0)} | "
                       f"{_num(g.get('faithfulness'))} |")
    if r.get("n"):
        out.append(f"Generation: {_num(r.get('latency_ms_per_reason'))} ms per returned reason (batches of "
                   f"{r.get('batch_size')}, max {r.get('max_new_tokens')} new tokens).")
        out += ["", "Samples (✓ true claim, ✗ false claim):", ""]
        for s in r.get("samples", [])[:N_MD_SAMPLES]:
            claims = ", ".join(f"{'✓' if c['true'] else '✗'} {c['kind']}={c['value']}" for c in s["claims"]) or "none"
            text = " ".join(s["reason"].split()).replace("|", "/")  # one line, no table breaks
            out.append(f"- {s['user']} → {s['song']} ({s.get('reason_source')}): “{text}” — claims: {claims}")
    return out
