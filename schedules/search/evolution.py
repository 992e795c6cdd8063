"""Evolutionary time-step search (AutoDiffusion, Li et al. 2023), done right.

* Genome: K *distinct, sorted* grid indices in 0..n-1 (the evaluated nodes; the terminal σ=0 is
  appended). Operators never produce a duplicate — AutoDiffusion's code can, and then silently
  samples with fewer steps.
* Initial population: every baseline valid for the model (snapped to the grid without
  collisions), their mutants, and random genomes.
* Each generation keeps the ``elite`` best, then fills the population with mutants of elites
  and uniform crossovers of two elites (followed by a mutation); a fitness cache skips genomes
  already visited.
* Fitness (lower is better): by default the mean squared distance of the final samples to the
  teacher's (:func:`~schedules.search.common.search_teacher`, Heun on the grid) on a fixed set
  of search samples; any ``fitness(sigmas) -> float`` can be plugged in (e.g. an FID from
  :mod:`eval`).
* Checkpoint after every generation (atomic JSON: population, cache, RNG state); a search
  started again with the same checkpoint resumes and ends with exactly the same result as an
  uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from schedules.baselines import BASELINES, steps_for
from schedules.io import StepsmithError, atomic_write_json
from schedules.search.common import (
    check_finite,
    final_mse_kind,
    grid_index,
    make_grid,
    mse,
    rollout,
    search_teacher,
)
from schedules.table import TimestepTable
from schedules.teacher import Teacher, teacher_sample

Genome = tuple[int, ...]


def is_valid(genome, K: int, n: int) -> bool:
    g = list(genome)
    return len(g) == K and all(0 <= v < n for v in g) and all(a < b for a, b in zip(g, g[1:]))


def random_genome(rng: np.random.Generator, K: int, n: int, fix_start: bool) -> Genome:
    if fix_start:
        rest = rng.choice(np.arange(1, n), size=K - 1, replace=False) if K > 1 else []
        return tuple(sorted([0, *map(int, rest)]))
    return tuple(sorted(map(int, rng.choice(n, size=K, replace=False))))


def mutate(rng: np.random.Generator, genome: Genome, n: int, p: float, fix_start: bool) -> Genome:
    """Each gene moves with probability ``p`` to an unused index: half the time a neighbour
    (±1..3), otherwise anywhere. At least one gene moves. The result is sorted and distinct."""
    g = list(genome)
    K = len(g)
    movable = list(range(1 if fix_start else 0, K))
    if not movable:
        return tuple(g)
    which = [m for m in movable if rng.random() < p] or [int(rng.choice(movable))]
    for m in which:
        used = set(g)
        lo = 1 if fix_start else 0
        if rng.random() < 0.5:
            cand = [g[m] + d for d in (-3, -2, -1, 1, 2, 3) if lo <= g[m] + d < n and g[m] + d not in used]
        else:
            cand = [v for v in range(lo, n) if v not in used]
        if cand:
            g[m] = int(rng.choice(cand))
    return tuple(sorted(g))


def crossover(rng: np.random.Generator, a: Genome, b: Genome, n: int, fix_start: bool) -> Genome:
    """Uniform crossover of sorted genomes: per position take a's or b's gene; duplicates are
    replaced by unused genes of the two parents, then by random unused indices."""
    K = len(a)
    child: list[int] = []
    for x, y in zip(a, b):
        v = x if rng.random() < 0.5 else y
        if v not in child:
            child.append(v)
    pool = [v for v in sorted(set(a) | set(b)) if v not in child]
    rng.shuffle(pool)
    while len(child) < K and pool:
        child.append(int(pool.pop()))
    lo = 1 if fix_start else 0
    while len(child) < K:
        v = int(rng.integers(lo, n))
        if v not in child:
            child.append(v)
    if fix_start and 0 not in child:
        child[int(np.argmin(child))] = 0
    return tuple(sorted(int(v) for v in child))


def snap_genome(grid: list[float], sigmas: list[float], n: int, fix_start: bool) -> Genome:
    idx = grid_index(grid, sigmas[:-1])
    K = len(idx)
    if fix_start:
        idx[0] = 0
    for m in range(1, K):
        idx[m] = max(idx[m], idx[m - 1] + 1)
    for m in range(K - 1, -1, -1):
        idx[m] = min(idx[m], n - (K - m))
        if m > 0 and idx[m - 1] >= idx[m]:
            idx[m - 1] = idx[m] - 1
    return tuple(int(v) for v in idx)


def _load_checkpoint(ckpt: Path, config_key: str, rng: np.random.Generator) -> tuple[dict, list[Genome], int]:
    """Resume a search: restores ``rng`` in place; returns (fitness cache, population, next generation)."""
    try:
        state = json.loads(ckpt.read_text())
    except json.JSONDecodeError:
        raise StepsmithError(f"checkpoint {ckpt} is corrupt; delete it to start over") from None
    if state.get("config_key") != config_key:
        raise StepsmithError(f"checkpoint {ckpt} belongs to another search (model/nfe/solver/seed/options); "
                             "delete it or choose another checkpoint path")
    rng.bit_generator.state = state["rng"]
    cache = {tuple(k): float(v) for k, v in state["cache"]}
    return cache, [tuple(g) for g in state["population"]], int(state["generation"]) + 1


def _initial_population(rng: np.random.Generator, initial: list[Genome], K: int, n: int, population: int,
                        p_mutation: float, fix_start: bool) -> list[Genome]:
    """The valid seeds, their mutants (up to about half the population), then random genomes."""
    seen: list[Genome] = []
    for g in initial:
        if is_valid(g, K, n) and g not in seen:
            seen.append(g)
    base = list(seen)
    for g in base:
        if len(seen) >= population // 2 + len(base) // 2:
            break
        m = mutate(rng, g, n, p_mutation, fix_start)
        if m not in seen:
            seen.append(m)
    tries = 0
    while len(seen) < population and tries < 100 * population:
        tries += 1
        r = random_genome(rng, K, n, fix_start)
        if r not in seen:
            seen.append(r)
    return seen


def _children(rng: np.random.Generator, parents: list[Genome], cache: dict, K: int, n: int, population: int,
              p_mutation: float, p_crossover: float, fix_start: bool) -> list[Genome]:
    """The elites, then new genomes: crossovers of two elites (half of them mutated) or mutants of one."""
    children: list[Genome] = list(parents)
    tries = 0
    while len(children) < population and tries < 50 * population:
        tries += 1
        if len(parents) > 1 and rng.random() < p_crossover:
            i, j = rng.choice(len(parents), size=2, replace=False)
            c = crossover(rng, parents[int(i)], parents[int(j)], n, fix_start)
            if rng.random() < 0.5:
                c = mutate(rng, c, n, p_mutation, fix_start)
        else:
            c = mutate(rng, parents[int(rng.integers(len(parents)))], n, p_mutation, fix_start)
        if c not in children and c not in cache:
            children.append(c)
    while len(children) < population:  # search space nearly exhausted: allow revisits
        c = random_genome(rng, K, n, fix_start)
        if c not in children:
            children.append(c)
    return children


def evolve(fitness: Callable[[Genome], float], K: int, n: int, *, seed: int = 0, population: int = 24,
           generations: int = 12, elite: int = 6, p_mutation: float = 0.25, p_crossover: float = 0.5,
           initial: list[Genome] | None = None, fix_start: bool = False, checkpoint: str | Path | None = None,
           config_key: str = "", progress: bool = False,
           on_generation: Callable[[int], None] | None = None) -> tuple[Genome, float, dict]:
    """Generic elitist GA over valid genomes; returns (best genome, its fitness, stats)."""
    if K > n:
        raise StepsmithError(f"{K} steps do not fit a grid of {n} evaluable nodes")
    if population < 2 or not 1 <= elite <= population:
        raise StepsmithError("evolution needs population ≥ 2 and 1 ≤ elite ≤ population")
    rng = np.random.default_rng(seed)
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        cache, pop, start_gen = _load_checkpoint(ckpt, config_key, rng)
    else:
        cache, start_gen = {}, 0
        pop = _initial_population(rng, initial or [], K, n, population, p_mutation, fix_start)

    def score(g: Genome) -> float:
        if g not in cache:
            v = float(fitness(g))
            if not np.isfinite(v):
                raise StepsmithError(f"fitness of genome {list(g)} is not finite ({v}); the model returned NaN/Inf?")
            cache[g] = v
        return cache[g]

    bar = tqdm(range(start_gen, generations), desc="evolution", disable=not progress, leave=False)
    for gen in bar:
        pop_scored = sorted({g: score(g) for g in pop}.items(), key=lambda kv: (kv[1], kv[0]))
        if gen == generations - 1:
            pop = [g for g, _ in pop_scored]
        else:
            pop = _children(rng, [g for g, _ in pop_scored[:elite]], cache, K, n, population, p_mutation,
                            p_crossover, fix_start)
        bar.set_postfix(best=f"{pop_scored[0][1]:.4g}")
        if ckpt is not None:
            atomic_write_json(ckpt, {"config_key": config_key, "generation": gen, "population": [list(g) for g in pop],
                                     "cache": [[list(k), v] for k, v in cache.items()],
                                     "rng": rng.bit_generator.state})
        if on_generation is not None:
            on_generation(gen)
    final = sorted(((g, score(g)) for g in set(pop) | set(cache)), key=lambda kv: (kv[1], kv[0]))
    best, val = final[0]
    return best, val, {"evaluated": len(cache), "generations": generations}


def _seed_genomes(adapter, nfe: int, solver: str, grid: list[float], fix_start: bool) -> list[Genome]:
    """Every baseline valid for the model, snapped to the grid (baselines the model refuses are skipped)."""
    n = len(grid) - 1
    out = []
    for fn in BASELINES.values():
        try:
            out.append(snap_genome(grid, fn(adapter, nfe, solver).sigmas, n, fix_start))
        except StepsmithError:
            continue
    return out


def _teacher_fitness(adapter, solver: str, grid: list[float], samples: int,
                     seed: int) -> tuple[Teacher, Callable[[list[float]], float]]:
    """The default fitness: final mse of ``solver`` along a table against the search teacher, on fixed noises."""
    teacher = search_teacher(grid)
    noise = adapter.noise(samples, seed)
    target = teacher_sample(adapter, noise, teacher, batch_size=16).x
    check_finite(target, "the reference trajectory")

    def fit(sigmas: list[float]) -> float:
        return mse(rollout(adapter, solver, sigmas, x=noise), target)

    return teacher, fit


def _config_key(adapter, nfe: int, solver: str, **options) -> str:
    """What a checkpoint must match to be resumed: the model, the budget and every search option."""
    src = json.dumps({"model": adapter.name, "nfe": nfe, "solver": solver, **options}, sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def evolution_table(adapter, nfe: int, solver: str = "euler", *, samples: int = 64, seed: int = 0,
                    progress: bool = False, grid: int | None = None, grid_kind: str = "auto",
                    population: int = 24, generations: int = 12, elite: int = 6, p_mutation: float = 0.25,
                    p_crossover: float = 0.5, fix_start: bool = False, checkpoint: str | None = None,
                    fitness: Callable[[list[float]], float] | None = None,
                    on_generation: Callable[[int], None] | None = None) -> TimestepTable:
    """AutoDiffusion search for ``make_table(method="evolution")``.

    By default the search also chooses where sampling starts (the noise may be read as the state at
    a later node, like diffusers' 'leading' spacing); ``fix_start=True`` pins the first node to σ_max.
    The default fitness is the final mse against the search teacher (Heun on the grid).
    """
    K = steps_for(adapter, nfe, solver)
    g = make_grid(adapter.convention, int(grid or 100), grid_kind)
    n = len(g) - 1
    if K > n:
        raise StepsmithError(f"NFE {nfe} ({K} steps) does not fit a grid of {n + 1} nodes; lower --nfe or raise --grid")
    t0 = time.perf_counter()
    teacher, fit = (None, fitness) if fitness is not None else _teacher_fitness(adapter, solver, g, samples, seed)
    t_ref = time.perf_counter() - t0
    key = _config_key(adapter, nfe, solver, seed=seed, samples=samples, grid=n, kind=grid_kind, population=population,
                      generations=generations, elite=elite, pm=p_mutation, pc=p_crossover, fix_start=fix_start,
                      custom_fitness=fitness is not None)
    best, val, stats = evolve(lambda gen: fit([g[i] for i in gen] + [0.0]), K, n, seed=seed, population=population,
                              generations=generations, elite=elite, p_mutation=p_mutation, p_crossover=p_crossover,
                              initial=_seed_genomes(adapter, nfe, solver, g, fix_start), fix_start=fix_start,
                              checkpoint=checkpoint, config_key=key, progress=progress, on_generation=on_generation)
    prov = {"grid": {"nodes": n + 1, "kind": grid_kind, "convention": adapter.convention.name},
            "population": population, "generations": generations, "elite": elite, "genomes_evaluated":
            stats["evaluated"], "reference_seconds": round(t_ref, 3), "genome": list(best),
            "teacher": None if teacher is None else teacher.describe(),
            "objective_kind": "custom fitness" if teacher is None else final_mse_kind(teacher),
            "checkpoint": checkpoint}
    return TimestepTable.from_sigmas([g[i] for i in best] + [0.0], convention=adapter.convention,
                                     prediction=adapter.prediction, solver=solver, method="evolution",
                                     model=adapter.name, objective=val, provenance=prov)
