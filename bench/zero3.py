"""ZeRO-3 benchmark (issue 17 item 2): what the round constraint costs. Llama-3 70B on 256 H100 (tp 8, 32 HDP
ranks), 128K max context, 4M tokens per step: step time of static, dcp and hdp at ZeRO-1 and ZeRO-3, and hdp's
idle time (waiting for partners, or for a round's slowest member). Prints markdown (docs/COSTMODEL.md "ZeRO-3").

    python -m bench.zero3
"""

from __future__ import annotations

import platform
from datetime import date

from planner.api import PlanRequest, build_cost_model, make_plan

CASES = [("byted-like", 0, "auto"), ("byted-like", 1, "auto"), ("github-like", 0, "auto"), ("github-like", 1, "auto"),
         ("byted-like", 0, "selective"), ("github-like", 0, "selective")]
STRATEGIES = ("static", "dcp", "hdp")


def main() -> None:
    print(f"\n### ZeRO-1 vs ZeRO-3, Llama-3 70B, 256 H100, tp 8, 128K, 4M tokens/step ({date.today()}, "
          f"{platform.node()})\n")
    print("| lengths, seed | recompute (Z1 / Z3) | " + " | ".join(f"Z{z} {s}" for z in (1, 3) for s in STRATEGIES)
          + " | idle Z1 / Z3 hdp |")
    print("|---|---|" + "---|" * (2 * len(STRATEGIES) + 1))
    for lengths, seed, rc in CASES:
        times, idle, policy = [], [], []
        for zero in (1, 3):
            req = PlanRequest(model="llama3-70b", cluster="dgx-h100", gpus=256, tp=8, max_context_tokens=128 * 1024,
                              tokens_per_step=4 * 2**20, zero_stage=zero, lengths=lengths, seed=seed, recompute=rc)
            cm = build_cost_model(req)
            policy.append(cm.setup.training.recompute)
            for s in STRATEGIES:
                st = make_plan(req, s, cm).steps[0]
                times.append(f"{st.predicted.step_time_s:.2f}")
                if s == "hdp":
                    idle.append(f"{st.predicted.breakdown['idle']:.2f}")
        print(f"| {lengths}, {seed} | {rc}: {' / '.join(policy)} | " + " | ".join(times) + f" | {' / '.join(idle)} |")


if __name__ == "__main__":
    main()
