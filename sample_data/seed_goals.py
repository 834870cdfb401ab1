"""Issue 26's goals for the seed study, and the Markdown of its checks and of the old-against-new recipe pairing
(``seed_analysis.py`` computes both; this module keeps that file short)."""
from __future__ import annotations


def goals(summary: dict) -> dict:
    """Issue 26's goals, per dataset and test, for the study's dMoE and baseline runs of the same seeds."""
    out: dict = {}
    for key, by_method in summary["by_method"].items():
        runs = {(r["method"], r["seed"]): r for r in summary["runs"] if f"{r['dataset']}/{r['test']}" == key}
        seeds = sorted({s for m, s in runs if m == "dmoe"} & {s for m, s in runs if m == "baseline"}, key=str)
        if not seeds:
            continue
        rows = []
        for s in seeds:
            d, b = runs[("dmoe", s)], runs[("baseline", s)]
            rows.append({"seed": s, "worst_dmoe": d["worst_group_dice"], "worst_baseline": b["worst_group_dice"],
                         "dmoe_worst_at_least_baseline": d["worst_group_dice"] >= b["worst_group_dice"],
                         "largest_group_drop": max(b["groups"][g] - d["groups"][g] for g in d["groups"]),
                         "lowest_group_any_method": min(min(r["groups"].values()) for (m, ss), r in runs.items()
                                                        if ss == s)})
        out[key] = {"seeds": rows,
                    "all_seeds_dmoe_worst_at_least_baseline": all(r["dmoe_worst_at_least_baseline"] for r in rows),
                    "no_group_below_0.7": all(r["lowest_group_any_method"] >= 0.7 for r in rows),
                    "no_group_drop_over_0.02": all(r["largest_group_drop"] <= 0.02 for r in rows)}
    return out


def goals_markdown(goal: dict) -> list[str]:
    lines = []
    for key, g in goal.items():
        lines += [f"Goals, {key.replace('/', ', ')}: dMoE worst group >= baseline's in every seed: "
                  f"{'yes' if g['all_seeds_dmoe_worst_at_least_baseline'] else 'NO'}; no group of any method below "
                  f"0.7: {'yes' if g['no_group_below_0.7'] else 'NO'}; no group under dMoE more than 0.02 below "
                  f"the baseline: {'yes' if g['no_group_drop_over_0.02'] else 'NO'}. Per seed (dMoE worst / baseline "
                  "worst / largest group drop / lowest group of any method): "
                  + "; ".join(f"{r['seed']}: {r['worst_dmoe']:.3f} / {r['worst_baseline']:.3f} / "
                              f"{r['largest_group_drop']:+.3f} / {r['lowest_group_any_method']:.3f}"
                              for r in g["seeds"]) + ".", ""]
    return lines


def old_new_markdown(old_new: dict | None) -> list[str]:
    if not old_new:
        return []
    lines = [f"### new recipe - old recipe, same seeds and cases (old: {old_new['old']}; per-case mean Dice)", ""]
    for key, by_method in old_new["contrasts"].items():
        for method, p in by_method.items():
            d = {k: p[f"delta_{k}"] for k in ("dice", "worst_group_dice")}
            seeds = ", ".join(f"{s}: " + " ".join(f"{g} {v['old']:.3f}->{v['new']:.3f}" for g, v in
                                                   zip(ps["old"], [{"old": ps["old"][g], "new": ps["new"][g]}
                                                                   for g in ps["old"]]))
                              for s, ps in p["per_seed"].items())
            lines += [f"- {key.replace('/', ', ')}, {method} (seeds {p['seeds_used']}): "
                      + "; ".join(f"{k} {v['value']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                                  for k, v in d.items())
                      + "; by group " + ", ".join(f"{g} {v:+.3f}" for g, v in p["per_case"]["by_group"].items())
                      + f". Per seed, old->new: {seeds}."]
    return lines + [""]
