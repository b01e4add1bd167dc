"""The protocol of the growth experiment: the models, the arms, their compute, and the arithmetic
that turns final losses into compute ratios.

Every arm is one complete training run (its own warmup and cosine decay). From-scratch ladders of
a large and a small model at several budgets give each family's loss-vs-compute frontiers; a grown
arm starts from the small model trained for N steps (the base), grows it to the large shape and
trains a stage of g steps with a fresh AdamW and a full re-warm. Compute is analytic training
FLOPs (`tokenformer.flops`): a grown arm's cumulative compute counts its base.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from tokenformer.flops import gpt_neox_flops, tokenformer_flops
from tokenformer.models.config import Config
from tokenformer.training.growth_schedule import growth_steps

FAMILIES = {"tf": "TokenFormer", "t": "Transformer"}
GROWTH_KINDS = {"tf": ("grown-exact", "grown-official"), "t": ("widen-exact", "widen-random")}


@dataclass(frozen=True)
class Protocol:
    steps: int = 2000                          # N: the base's (and the large model's longest) budget
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    seq_length: int = 64
    batch: int = 16                            # windows per step
    small_slots: tuple[int, int, int] = (64, 64, 256)  # qkv, proj, ffn tokens of TF-S
    token_factor: int = 3                      # TF-L has 3x the parameter tokens of TF-S
    large_budgets: tuple[float, ...] = (0.25, 0.5, 1.0)
    small_budgets: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.5)  # 1.0 is the base
    stage_budgets: tuple[float, ...] = (0.1, 0.25, 0.5)
    tf_seeds: tuple[int, ...] = (0, 1, 2)
    t_seeds: tuple[int, ...] = (0, 1)
    lr_sweep: tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3)
    sweep_budget: float = 0.25                 # the sweep trains each large model this share of N
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    eval_iters: int = 64                       # x batch x seq_length = 65,536 held-out bytes
    evals_per_run: int = 8
    schedule: str = "cosine"                   # every arm's: cosine, or wsd (warmup-stable-decay)
    wsd_decay_fraction: float = 0.2
    fixed_lr: tuple[float, float] | None = None  # (TokenFormer, Transformer) peak lr instead of a sweep
    # growth inside one N-step run (the schedule goes on; kinds in IN_RUN_KINDS)
    grow_points: tuple[float, ...] = ()        # carry and rewarm arms (and the Transformer's) grow here
    one_point: float = 0.5                     # the fresh-optimizer and noise arms grow here
    two_step_points: tuple[float, float] = (0.25, 0.5)  # S -> M (2x the tokens) -> L
    rewarm_fraction: float = 0.0125            # the short re-warm, a share of N (100 steps of 8000)
    grow_noise: float = 0.1                    # the noise arm: old tokens + N(0, this x their std)

    @classmethod
    def quick(cls) -> "Protocol":
        """Minutes on 2 cores, for a smoke test: every arm and every number, on toy budgets."""
        return cls(steps=24, hidden_size=32, num_attention_heads=2, seq_length=32, batch=4,
                   small_slots=(16, 16, 64), tf_seeds=(0,), t_seeds=(0,), lr_sweep=(2e-3, 4e-3),
                   eval_iters=2, evals_per_run=4, schedule="wsd", grow_points=(0.5,), rewarm_fraction=0.1)

    @classmethod
    def in_run(cls) -> "Protocol":
        """Growth inside one run, in the regime where the gate opened (width 32, N = 8000): WSD for
        every arm, no post-hoc arms, TokenFormer's peak lr 2e-3 (seed 2's large model fails from its init
        at any lr tried: `experiments.growth.diagnose`, growth.md)."""
        return cls(steps=8000, hidden_size=32, num_attention_heads=2, small_slots=(32, 32, 128),
                   small_budgets=(0.5, 1.0, 1.5, 2.5), stage_budgets=(), schedule="wsd", fixed_lr=(2e-3, 8e-3),
                   grow_points=(0.25, 0.5, 0.75), evals_per_run=16)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_length

    @property
    def held_out_tokens(self) -> int:
        return self.eval_iters * self.batch * self.seq_length

    def slots(self, size: str) -> dict[str, int]:
        factor = {"small": 1, "medium": 2}.get(size, self.token_factor)
        q, p, f = (n * factor for n in self.small_slots)
        return dict(qkv_slot_num=q, proj_slot_num=p, ffn_slot_num=f)

    def ffn_width(self, size: str) -> int:
        """The Transformer FFN width with the weights and FLOPs of the TokenFormer of that size."""
        s = self.slots(size)
        return 3 * s["qkv_slot_num"] + s["proj_slot_num"] + s["ffn_slot_num"] - 2 * self.hidden_size

    def model(self, family: str, size: str) -> dict[str, Any]:
        shape = dict(num_layers=self.num_layers, hidden_size=self.hidden_size,
                     num_attention_heads=self.num_attention_heads, seq_length=self.seq_length, vocab_size=257)
        if family == "tf":
            return {**shape, **self.slots(size)}
        return {**shape, "ffn_width": self.ffn_width(size)}

    def step_flops(self, family: str, size: str) -> float:
        """Training FLOPs (forward + backward matmuls) of one optimizer step."""
        m = self.model(family, size)
        if family == "tf":
            per_token = tokenformer_flops(Config(**m)).training().total
        else:
            vocab = Config(**self.model("tf", size)).padded_vocab_size  # the same padded vocabulary
            per_token = gpt_neox_flops(m["hidden_size"], m["num_layers"], m["ffn_width"], vocab,
                                       m["seq_length"]).training().total
        return per_token * self.tokens_per_step

    def budget_steps(self, budget: float) -> int:
        return max(2, round(budget * self.steps))

    def growth_step(self, point: float) -> int:
        """The optimizer step of an N-step run after which it grows (as the trainer rounds it)."""
        return growth_steps([point], self.budget_steps(1.0))[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Arm:
    """One training run of the experiment."""

    family: str          # tf or t
    kind: str            # sweep, large, small, or a growth kind (GROWTH_KINDS)
    seed: int
    budget: float        # in units of N
    steps: int
    lr: float | None = None   # None: the family's swept lr
    parent: str | None = None  # the base arm a grown arm starts from
    grow_at: tuple[float, ...] = ()  # an in-run arm: grows after these shares of its steps
    prefix: str | None = None  # an in-run arm: the small model's N-step run, whose steps before the growth it shares

    @property
    def name(self) -> str:
        lr = f"/lr{self.lr:g}" if self.kind == "sweep" else ""
        at = "@" + "+".join(f"{g:g}" for g in self.grow_at) if self.grow_at else ""
        return f"{self.family}/{self.kind}{at}/{self.budget:g}N/seed{self.seed}{lr}"

    @property
    def label(self) -> str:
        """The arm's row in the summary: its kind and its growth point or stage."""
        return self.name.rsplit("/seed", 1)[0].split("/", 1)[1]

    @property
    def size(self) -> str:
        return "small" if self.kind == "small" else "large"

    @property
    def grown(self) -> bool:
        return self.parent is not None or bool(self.grow_at)

    def sizes(self) -> list[str]:
        """The shapes an in-run arm trains through, one per segment between growths."""
        return ["small", "medium", "large"] if len(self.grow_at) == 2 else ["small", "large"]


# in-run kinds: (family, kind) -> the trainer's grow_mode, grow_optimizer, re-warm?, noise?
IN_RUN_KINDS = {("tf", "in-run-carry"): ("exact", "carry", False, False),
                ("tf", "in-run-rewarm"): ("exact", "carry", True, False),
                ("tf", "in-run-fresh"): ("exact", "fresh", True, False),
                ("tf", "in-run-noise"): ("official", "carry", False, True),
                ("tf", "in-run-official"): ("official", "carry", False, False),
                ("tf", "in-run-2step"): ("exact", "carry", False, False),
                ("t", "widen-carry"): ("exact", "carry", False, False)}


def in_run_arms(p: Protocol, family: str, seed: int) -> list[Arm]:
    n, points = p.budget_steps(1.0), p.grow_points
    if not points:
        return []
    at = {"in-run-carry": points, "widen-carry": points, "in-run-fresh": (p.one_point,),
          "in-run-noise": (p.one_point,), "in-run-official": points, "in-run-2step": None,
          "in-run-rewarm": points}
    out = [Arm(family, kind, seed, 1.0, n, grow_at=p.two_step_points if g is None else (g,))
           for kind, where in at.items() if (family, kind) in IN_RUN_KINDS for g in (where or [None])]
    return sorted(out, key=lambda a: in_run_priority(p, a))


def in_run_priority(p: Protocol, arm: Arm) -> int:
    """The order in which the in-run arms run (a run stopped early has the most telling ones):
    carried moments at `one_point`, then later, then the re-warm and the fresh optimizer there,
    then carried moments earlier, the noise (and official growth without it), the two-step
    chain, the other re-warms."""
    point, late = arm.grow_at[0], arm.grow_at[0] > p.one_point
    if arm.kind in ("in-run-carry", "widen-carry"):
        return 0 if point == p.one_point else 1 if late else 4
    return {"in-run-rewarm": 2 if point == p.one_point else 7, "in-run-fresh": 3, "in-run-noise": 5,
            "in-run-official": 6, "in-run-2step": 6}[arm.kind]


def trunks(p: Protocol, all_arms: list[Arm]) -> list[Arm]:
    """With `wsd`, every arm of a family, seed and first shape shares its steps up to where its own
    lr leaves the peak (the same warmup, then the same constant lr, the same init and data order);
    the longest run of a ladder is the trunk the others branch from (`with_trunks`)."""
    return [a for a in all_arms if a.kind in ("large", "small") and a.budget == max(
        b.budget for b in all_arms if (b.family, b.kind, b.seed) == (a.family, a.kind, a.seed))]


def with_trunks(p: Protocol, all_arms: list[Arm]) -> list[Arm]:
    """The arms, each ladder arm and in-run arm given the trunk it branches from (`prefix`) under
    `wsd`; trunks first, so that what branches waits for nothing that comes later."""
    if p.schedule != "wsd":
        return all_arms
    heads = {(a.family, a.kind, a.seed): a for a in trunks(p, all_arms)}
    out = []
    for a in all_arms:
        trunk = heads.get((a.family, "small" if a.grow_at else a.kind, a.seed))
        if trunk is not None and trunk != a and (a.grow_at or a.kind in ("large", "small")):
            a = dataclasses.replace(a, prefix=trunk.name)
        out.append(a)
    return out


def branch_step(p: Protocol, arm: Arm) -> int:
    """The step from which `arm` continues its trunk: its first growth, or where its own WSD decay
    starts (`optim.Schedule.stable_until`)."""
    if arm.grow_at:
        return p.growth_step(arm.grow_at[0])
    return arm.steps - int(round(p.wsd_decay_fraction * arm.steps))


def branch_interval(p: Protocol, all_arms: list[Arm], trunk: Arm) -> int:
    """How often a trunk keeps a checkpoint, so that every arm that branches from it finds one."""
    steps = [branch_step(p, a) for a in all_arms if a.prefix == trunk.name]
    return math.gcd(*steps) if steps else trunk.steps


def arms(p: Protocol) -> list[Arm]:
    """Every arm, in an order where each comes after what it needs, seed by seed (so that a run
    stopped early holds whole seeds of both families; the re-warm arms away from `one_point` last
    in each, the comparisons least needed)."""
    out = [Arm(family, "sweep", 0, p.sweep_budget, p.budget_steps(p.sweep_budget), lr=lr)
           for family in FAMILIES for lr in (p.lr_sweep if p.fixed_lr is None else ())]
    for index in range(max(len(p.tf_seeds), len(p.t_seeds))):
        block = []
        for family, seeds in (("tf", p.tf_seeds), ("t", p.t_seeds)):
            if index >= len(seeds):
                continue
            seed = seeds[index]
            block += [Arm(family, "large", seed, b, p.budget_steps(b)) for b in p.large_budgets]
            block += [Arm(family, "small", seed, b, p.budget_steps(b)) for b in p.small_budgets]
            base = Arm(family, "small", seed, 1.0, p.budget_steps(1.0)).name
            block += [Arm(family, kind, seed, g, p.budget_steps(g), parent=base)
                      for kind in GROWTH_KINDS[family] for g in p.stage_budgets]
            block += in_run_arms(p, family, seed)
        late = [a for a in block if a.kind == "in-run-rewarm" and a.grow_at != (p.one_point,)]
        out += [a for a in block if a not in late] + late
    return with_trunks(p, out)


def flops_at(p: Protocol, arm: Arm, step: float) -> float:
    """Training compute after `step` steps of the arm (an in-run arm changes shape at its growths;
    a post-hoc grown arm counts its base)."""
    if arm.grow_at:
        edges = [0, *(p.growth_step(g) for g in arm.grow_at), math.inf]
        return sum(max(0.0, min(step, hi) - lo) * p.step_flops(arm.family, size)
                   for lo, hi, size in zip(edges, edges[1:], arm.sizes()))
    base = p.budget_steps(1.0) * p.step_flops(arm.family, "small") if arm.parent else 0.0
    return base + step * p.step_flops(arm.family, arm.size)


def arm_flops(p: Protocol, arm: Arm) -> dict[str, float]:
    """The arm's compute: cumulative, and split at its (first) growth into base and stage (an arm
    that does not grow has no base)."""
    total = flops_at(p, arm, arm.steps)
    base = flops_at(p, arm, p.growth_step(arm.grow_at[0])) if arm.grow_at else flops_at(p, arm, 0)
    return {"stage": total - base, "base": base, "cumulative": total}


# ---- frontiers and ratios ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reach:
    """Compute to reach a loss on a frontier: exact (`=`), or a bound when the loss lies outside
    the frontier's range (`>`: below its lowest loss, `<`: above its highest)."""

    flops: float
    bound: str = "="

    def over(self, denominator: float) -> "Reach":
        return Reach(self.flops / denominator, self.bound)

    def __str__(self) -> str:
        return f"{'' if self.bound == '=' else self.bound}{self.flops:.3g}"


def lower_envelope(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(compute, loss) sorted by compute, each loss the best so far (more compute never hurts)."""
    out, best = [], math.inf
    for flops, loss in sorted(points):
        best = min(best, loss)
        out.append((flops, best))
    return out


def compute_to_reach(points: Sequence[tuple[float, float]], loss: float) -> Reach:
    """The compute at which a from-scratch frontier reaches `loss`, linear in log(compute) between
    its points; outside them a bound at the nearest end."""
    frontier = lower_envelope(points)
    if loss >= frontier[0][1]:
        return Reach(frontier[0][0], "<" if loss > frontier[0][1] else "=")
    for (c0, l0), (c1, l1) in zip(frontier, frontier[1:]):
        if l1 <= loss:
            if l0 == l1:
                return Reach(c0)
            t = (l0 - loss) / (l0 - l1)
            return Reach(math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0))))
    return Reach(frontier[-1][0], ">")


def loss_at(points: Sequence[tuple[float, float]], flops: float) -> float:
    """The frontier's loss at `flops` (linear in log compute; the end values outside)."""
    frontier = lower_envelope(points)
    if flops <= frontier[0][0]:
        return frontier[0][1]
    for (c0, l0), (c1, l1) in zip(frontier, frontier[1:]):
        if flops <= c1:
            t = (math.log(flops) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return l0 + t * (l1 - l0)
    return frontier[-1][1]


def ratios(loss: float, flops: dict[str, float], large: Sequence[tuple[float, float]],
           small: Sequence[tuple[float, float]]) -> dict[str, Reach]:
    """The compute ratios of a grown arm that ended at `loss`:
    R_incl = from-scratch (large) compute to reach it / (base + stage): the paper's Figure 3;
    R_excl = the same over the stage only: its Figure 4;
    R_best = the better (smaller) of the large and small frontiers' compute / (base + stage):
    growing pays only if this is above 1."""
    to_large, to_small = compute_to_reach(large, loss), compute_to_reach(small, loss)
    return {"R_incl": to_large.over(flops["cumulative"]), "R_excl": to_large.over(flops["stage"]),
            "R_best": smaller(to_large, to_small).over(flops["cumulative"])}


def smaller(a: Reach, b: Reach) -> Reach:
    """The smaller of two compute-to-reach values, bounded as the bounds of both allow: if the
    larger is only known to be below its value (`<`), the minimum may lie below the smaller too."""
    low, high = sorted((a, b), key=lambda r: r.flops)
    return Reach(low.flops, "<" if high.bound == "<" and low.bound == "=" else low.bound)


def mean_and_range(values: Sequence[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
