"""What DeepEP's flex dispatcher, HybridEP and Megatron-core's EP all-to-all overlap make of the published MoE runs
whose expert groups cross nodes (costmodel.moe, docs/COSTMODEL.md "DeepEP", "EP all-to-all overlap"): each row of
`meshplan validate --set megatron_bridge_moe2025` with an inter-node expert group priced under the six
combinations of dispatcher (alltoall, flex, hybridep) and overlap (off, on), its own marked; and the remote nodes a
token's experts lie in, with and without node-limited routing. Figures from the cost model, never pass/fail.

    python -m bench.ep_dispatch
    python -m bench.ep_dispatch --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# bench/ holds scripts named like packages (bench/planner.py): import the real packages, not them.
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from costmodel.moe import remote_domains_per_token  # noqa: E402
from costmodel.presets import load_cluster, load_model  # noqa: E402
from planner.studies.validation import iteration_row, load_calibration_set  # noqa: E402
from profiles.table import load_profile  # noqa: E402

SET = "megatron_bridge_moe2025"
VARIANTS = (("alltoall", False), ("alltoall", True), ("flex", False), ("flex", True), ("hybridep", False),
            ("hybridep", True))


def rows() -> list[dict]:
    cal = load_calibration_set(SET)
    profile = load_profile(load_cluster(cal.cluster).profile)
    out = []
    for case in cal.iteration_cases:
        own = (case.training.get("moe_dispatcher", "alltoall"), bool(case.training.get("ep_comm_overlap", False)))
        priced = []
        for dispatcher, overlap in VARIANTS:
            if overlap and case.pp > 1 and case.chunks == 1:
                continue  # Megatron-core pairs passes under virtual stages only
            run = dataclasses.replace(case, training={**case.training, "moe_dispatcher": dispatcher,
                                                      "ep_comm_overlap": overlap})
            r = iteration_row(cal, run, profile)
            priced.append({"case": case.label, "dispatcher": dispatcher, "ep_comm_overlap": overlap,
                           "published_s": r.published, "predicted_s": r.predicted, "error": r.error,
                           "exposed_comm_share": r.parts.get("tp_comm", 0.0) / r.predicted,
                           "recipe": (dispatcher, overlap) == own})
        by = {(x["dispatcher"], x["ep_comm_overlap"]): x["predicted_s"] for x in priced}
        if by[("flex", False)] != by[("alltoall", False)]:  # DeepEP inside one node is priced as NCCL's: skip those
            out += priced
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    out = Console(width=150)  # the tables whole, in a pipe too
    data = rows()
    t = Table(title=f"{SET}: inter-node expert groups by dispatcher and EP overlap (h100-sxm.analytic; "
                    "*: the row's own recipe)")
    for c in ("case", "dispatch", "overlap", "published s", "predicted s", "error", "exposed comm"):
        t.add_column(c, justify="left" if c in ("case", "dispatch") else "right")
    for r in data:
        t.add_row(r["case"] + ("*" if r["recipe"] else ""), r["dispatcher"],
                  "on" if r["ep_comm_overlap"] else "off", f"{r['published_s']:.2f}", f"{r['predicted_s']:.2f}",
                  f"{r['error']:+.1%}", f"{r['exposed_comm_share']:.1%}")
    out.print(t)
    ds = load_model("deepseek-v3")
    free = dataclasses.replace(ds, expert_groups=1, groups_per_token=1)
    t = Table(title="DeepSeek-V3: other nodes a token's 8 experts are on (256 experts over D nodes)")
    for c in ("nodes D", "4 of 8 groups", "unlimited", "NCCL: copies over the NIC"):
        t.add_column(c, justify="right")
    for d in (2, 4, 8, 16):
        t.add_row(str(d), f"{remote_domains_per_token(ds, d):.2f}", f"{remote_domains_per_token(free, d):.2f}",
                  f"{ds.top_k * (d - 1) / d:.2f}")
    out.print(t)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
