"""bench/quality.py's target check: the values it reads, the bars, and by how much a miss falls short."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quality.py"  # a script, not a package: load it by path
_spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _summary(**ratios_by_slice):
    return {name: {"ratios": ratios} for name, ratios in ratios_by_slice.items()}


def test_nowplaying_targets_report_the_shortfall_as_a_share_of_the_bar():
    summary = _summary(**{"warm-known": {"hybrid/best_cf": 0.882}, "all": {"hybrid/best_cf": 1.2},
                          "cold": {"llmrec/mm2cf": None}})
    rows = {t["target"]: t for t in quality.targets("nowplaying", summary, None)}
    assert len([r for r in rows if not r.startswith("reasons:")]) == 3
    warm = rows["hybrid vs best CF, warm-known recall@20"]
    assert not warm["met"] and warm["required"] == 0.98 and warm["short_by"] == pytest.approx(0.1)  # 1 - .882/.98
    everything = rows["hybrid vs best CF, all recall@20"]
    assert everything["met"] and everything["short_by"] is None
    unknown = rows["llmrec vs mm2cf, cold recall@20"]  # llmrec not trained: no value, not met
    assert unknown["value"] is None and not unknown["met"] and unknown["short_by"] is None


def test_every_llmrec_target_has_a_no_llm_ratio_beside_it():
    for dataset in ("synthetic", "lastfm", "nowplaying"):
        whats = [t[1] for t in quality.RATIO_TARGETS if t[0] == dataset]
        assert any("mm2cf" in w for w in whats), dataset
    assert ("llmrec", "mm2cf") in quality.RATIOS and ("hybrid", "mm2cf-hybrid") in quality.RATIOS


def test_the_tail_target_counts_only_hybrids_within_the_ndcg_budget():
    summary = _summary(cold={"llmrec/mm2cf": 1.3})
    tail = {"als_tail_share@20": 0.2,
            "hybrid": {"tail_share_vs_als": 1.35, "ndcg@20_change_vs_als": 0.01},
            "hybrid-tail": {"tail_share_vs_als": 3.5, "ndcg@20_change_vs_als": -0.12},  # over the 5% budget
            "llmrec": {"tail_share_vs_als": 4.0, "ndcg@20_change_vs_als": -0.4}}  # not a hybrid
    cold, tail_row = quality.targets("synthetic", summary, tail)[:2]
    assert cold["met"] and cold["value"] == 1.3
    assert tail_row["value"] == 1.35 and not tail_row["met"] and tail_row["short_by"] == pytest.approx(0.1)
    tail["hybrid-tail"]["ndcg@20_change_vs_als"] = -0.04
    assert quality.targets("synthetic", summary, tail)[1]["value"] == 3.5
    assert quality.verdict(quality.targets("synthetic", summary, tail)[1], "met", "NOT met") == "met"
    assert quality.targets("synthetic", summary, None)[1]["value"] is None


def test_the_markdown_has_the_targets_table():
    result = {"quick": True, "overrides": [], "datasets": {"nowplaying": {
        "item_kind": "song", "split": "item_holdout", "llmrec_trained": True, "slices": {},
        "targets": quality.targets("nowplaying", _summary(**{"warm-known": {"hybrid/best_cf": 0.882}}), None)}}}
    md = quality.results_markdown(result)
    assert "| hybrid vs best CF, warm-known recall@20 | 0.882 | 0.98 | no, short by 10% |" in md
    assert "| hybrid vs best CF, all recall@20 | – | 1.1 | no (not measured) |" in md


def test_the_markdown_says_how_many_new_items_reach_the_top_20():
    slices = {"all": {"models": {"als": {"recall@20": 0.2, "new_share@20": 0.0},
                                 "hybrid": {"recall@20": 0.24, "new_share@20": 0.1734}}}}
    line = quality.new_items_markdown(slices)[1]
    assert "hybrid 0.173" in line and "als" not in line  # models that show no new item are left out
    assert quality.new_items_markdown({"all": {"empty": True}}) == []
    assert quality.new_items_markdown({"all": {"models": {"als": {"new_share@20": 0.0}}}}) == []


def test_rerunning_one_dataset_keeps_the_other_sections(tmp_path):
    def result(name: str, when: str) -> dict:
        return {"datasets": {name: {"command": f"python bench/quality.py --dataset {name}", "generated": when,
                                    "seconds": 60.0, "item_kind": "song", "split": "temporal", "llmrec_trained": True,
                                    "slices": {}, "subset": {"songs": [15753, 3000], "users": [18310, 17779],
                                                             "interactions": [333550, 162699]}}}}

    md = tmp_path / "quality.md"
    quality.write_markdown(md, result("nowplaying", "day 1"))
    quality.write_markdown(md, result("synthetic", "day 2"))
    quality.write_markdown(md, result("nowplaying", "day 3"))
    text = md.read_text()
    assert text.index("## synthetic") < text.index("## nowplaying")  # the datasets' fixed order
    assert "--dataset synthetic`; generated day 2" in text and "--dataset nowplaying`; generated day 3" in text
    assert "day 1" not in text and "3,000 most-listened of 15,753" in text
    assert set(json.loads(md.with_suffix(".json").read_text())["datasets"]) == {"synthetic", "nowplaying"}


def test_reason_targets_read_the_served_reasons_and_a_maximum_is_a_ceiling():
    reasons = {"faithfulness": 0.95, "hallucination_rate": 0.30, "titles_from_history": 1.0, "claim_share": 0.97,
               "unique_share": 0.6}
    rows = {t["target"]: t for t in quality.targets("synthetic", {}, None, reasons)}
    assert rows["reasons: faithfulness"]["met"]
    hallucination = rows["reasons: hallucination rate"]
    assert not hallucination["met"] and hallucination["at_most"] and hallucination["short_by"] == 0.1765
    assert not rows["reasons: unique share"]["met"]  # 0.6 < 0.8 on synthetic
    real = {t["target"]: t for t in quality.targets("nowplaying", {}, None, reasons)}
    assert real["reasons: unique share"]["met"] and real["reasons: share of reasons with >= 1 checkable claim"]["met"]
    assert all(t["value"] is None and not t["met"] for t in quality.targets("lastfm", {}, None, None)
               if t["target"].startswith("reasons"))
