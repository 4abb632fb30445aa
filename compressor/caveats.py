"""Plans that probably do not do what the user meant: said as warnings, never refused.

A plan may be valid and still surprising: ``rank: full`` (or no rank and no target) is exact but
bigger than the conv it replaces, and a ``target`` whose rules all fix a rank has nothing to solve.
Either may be meant (``lossless.yaml`` grows MACs on purpose), so they are warnings, not errors;
run silently, both looked like the tool failing to compress.
"""

from __future__ import annotations

from collections.abc import Sequence

from compressor.report import format_count

#: How many layer names a warning lists before it says "and N more".
SHOWN_NAMES = 4


def _names(names: Sequence[str]) -> str:
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(names[:SHOWN_NAMES]) + more


def plan_caveats(report: dict, recipe) -> list[str]:
    """One line per surprise in a plan's report (:meth:`compressor.pipeline.Plan.report`)."""
    caveats = []
    totals = report.get("totals")
    if totals and totals["macs_after"] > totals["macs_before"]:
        grown = [
            layer["name"] for layer in report["layers"] if (layer["macs_after"] or 0) > (layer["macs_before"] or 0)
        ]
        caveats.append(
            f"the plan grows MACs from {format_count(totals['macs_before'])} to {format_count(totals['macs_after'])} "
            f"per sample (x{totals['macs_ratio']:.3f}): {len(grown)} rewritten layer(s) cost more than the conv they "
            f"replace ({_names(grown)}); a rank that is full, or unset without a target, keeps the layer exact but not cheaper"
        )
    target = report.get("target")
    if target is not None and not target.get("solved_layers"):
        fixed = [rule.describe(i) for i, rule in enumerate(recipe.rules) if not rule.solved and rule.methods != ("keep",)]
        verb = "fixes its rank" if len(fixed) == 1 else "fix their ranks"
        why = f"{_names(fixed)} {verb}" if fixed else "no rule rewrites a layer"
        caveats.append(
            f"target {{{target['metric']}: {target['fraction']:g}}} changes nothing: no layer is left to the budget "
            f"solver because {why}; remove the rank (e.g. --set rules.0.rank=null) for the target to choose it"
        )
    return caveats
